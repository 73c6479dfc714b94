#!/usr/bin/env bash
# The main job on the embedded default: fetch SmolLM2-135M-Instruct (a real LLaMA-architecture
# model) and generate an answer with int8 linears — on the CPU (the CUDA backend for whole
# models is still being built; `recforge info` shows what the machine has).
#
# Usage: scripts/demo.sh ["your prompt"]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-cuda-toolchain.sh >/dev/null
scripts/fetch-assets.sh >/dev/null
cargo build --release --quiet
./target/release/recforge info
./target/release/recforge generate --prompt "${1:-What is the capital of France?}" --max-new-tokens 64

#!/usr/bin/env bash
# The test command: installs what the tests need (the pinned CUDA toolchain from PyPI wheels,
# the real model and dataset assets), runs the simulator's C++ suite, then every Rust test with
# the CUDA kernels required to compile (kernel tests run in the simulator; on CUDA too when a
# GPU is usable). Idempotent and quick when everything is already installed.
#
# Usage: scripts/test.sh [extra cargo test arguments]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-cuda-toolchain.sh >/dev/null
scripts/fetch-assets.sh >/dev/null
# The SIMT simulator's own C++ suite (primitive semantics, misuse reports, ASan + UBSan).
kernels/sim/tests/run.sh
export RECFORGE_REQUIRE_KERNELS=1
export RECFORGE_REQUIRE_ASSETS=1
cargo test --release "$@"
# The kernel tests once more with the simulator's guard page BEFORE each buffer instead of
# after it, so a read or write before a buffer's first element faults too (~20 s).
RECFORGE_SIM_GUARD=start cargo test --release --test simulator --test kernels \
    --test kernels_linear --test kernels_elementwise --test kernels_train --test kernels_attention \
    --test attention_saved --test kernels_paged --test kernels_sampling --test gpu_backend
# The training step once more with the 128 × 128 GEMM tiles forced (the W8A8 forward and the
# pipelined dX): the test shapes are below the size where `w8a8::gemm_tile` and
# `w8a16::dx_tile` pick them, and the kernel tests alone do not run them inside a whole
# forward and backward pass (~10 s).
RECFORGE_W8A8_TILE=128 RECFORGE_DX_TILE=128 cargo test --release --test train
# And with the Hopper wgmma tiles for the W8A8 forward and the int8 dX (the simulator runs them
# on any machine; nothing picks them by default yet) (~10 s).
RECFORGE_W8A8_TILE=wg RECFORGE_DX_TILE=wg cargo test --release --test train
# And with the LoRA up-projection in the W8A8 GEMM's epilogue (RECFORGE_LORA_UP=epilogue; the
# default is its own pass after the GEMM), so both places run inside a whole step (~10 s).
RECFORGE_LORA_UP=epilogue cargo test --release --test train

#!/usr/bin/env bash
# The test command: installs what the tests need (the pinned CUDA toolchain from PyPI wheels,
# the real model and dataset assets), then runs every test with the CUDA kernels required to
# compile. Idempotent and quick when everything is already installed.
#
# Usage: scripts/test.sh [extra cargo test arguments]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-cuda-toolchain.sh >/dev/null
scripts/fetch-assets.sh >/dev/null
export RECFORGE_REQUIRE_KERNELS=1
export RECFORGE_REQUIRE_ASSETS=1
cargo test --release "$@"

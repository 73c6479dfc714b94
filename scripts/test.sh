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

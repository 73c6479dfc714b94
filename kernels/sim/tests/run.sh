#!/usr/bin/env bash
# Builds and runs the SIMT simulator's tests with g++ only (no cargo, no GPU):
#   1. the simulator + generated-style kernel TUs + tests at -O2, run;
#   2. the same under -fsanitize=address,undefined (fiber switches annotated for ASan), run --quick;
#   3. if nvcc is available, checks the test kernels and rmsnorm.cu still compile to PTX.
# Usage: kernels/sim/tests/run.sh [--no-asan]
set -euo pipefail
root="$(cd "$(dirname "$0")/../../.." && pwd)"
out="${RF_SIM_TEST_OUT:-/tmp/rf_sim_tests}"
mkdir -p "$out"
cd "$root"
CXX="${CXX:-g++}"
flags=(-std=c++17 -DRF_SIM -I kernels -Wall -Wextra -Wno-unknown-pragmas)
srcs=(kernels/sim/rf_sim.cpp kernels/sim/tests/sim_rmsnorm.cpp kernels/sim/tests/sim_test_kernels.cpp kernels/sim/tests/test_main.cpp)

build() {  # build <name> <extra flags...>
    local name="$1"; shift
    local objs=()
    for s in "${srcs[@]}"; do
        local o="$out/$name.$(basename "$s" .cpp).o"
        "$CXX" "${flags[@]}" "$@" -c "$s" -o "$o" &
        objs+=("$o")
    done
    wait
    "$CXX" "$@" "${objs[@]}" -o "$out/$name" -pthread
}

echo "== build -O2"
build test_o2 -O2
echo "== run"
"$out/test_o2"
if [[ "${1:-}" != "--no-asan" ]]; then
    echo "== build -O1 -fsanitize=address,undefined"
    build test_asan -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
    echo "== run (ASan + UBSan)"
    ASAN_OPTIONS=detect_leaks=0 "$out/test_asan" --quick
fi
nvcc="${NVCC:-$root/.toolchain/cuda/bin/nvcc}"
if [[ -x "$nvcc" ]]; then
    echo "== nvcc -ptx (test kernels, rmsnorm)"
    for f in kernels/sim/tests/test_kernels.cu kernels/rmsnorm.cu; do
        "$nvcc" -ptx -arch=compute_80 -O3 -std=c++17 -I kernels -ccbin /usr/bin/g++ -o "$out/$(basename "$f" .cu).ptx" "$f"
    done
fi
echo "== all simulator tests passed"

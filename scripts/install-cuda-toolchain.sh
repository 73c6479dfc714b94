#!/usr/bin/env bash
# Install a pinned, self-contained CUDA 13.0 device-compiler toolchain
# (nvcc, cicc, ptxas, CUDA runtime/bf16/fp16 headers, CCCL) from PyPI wheels
# into <repo>/.toolchain/cuda. Idempotent: a re-run with a good install is a
# quick no-op.
#
# Resulting layout (all relative symlinks, so the repo may be moved):
#   .toolchain/cuda/site/                pip --target tree (nvidia/cu13/...)
#   .toolchain/cuda/home -> site/nvidia/cu13     CUDA_HOME-like tree:
#        bin/{nvcc,ptxas,...} include/ nvvm/{bin/cicc,libdevice} lib/ lib64->lib
#   .toolchain/cuda/bin  -> home/bin     => .toolchain/cuda/bin/nvcc (fixed path)
#   .toolchain/cuda/.installed           stamp (pins + layout version)
#
# Usage:   scripts/install-cuda-toolchain.sh [--force]
# Env:     PYTHON (default python3), CUDA_HOST_CXX (default /usr/bin/g++)
# Prints the nvcc path as the last line of stdout.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd -P)"
TOOLCHAIN_DIR="$REPO_ROOT/.toolchain"
DEST="$TOOLCHAIN_DIR/cuda"
STAMP_NAME=".installed"
PYTHON="${PYTHON:-python3}"
HOST_CXX="${CUDA_HOST_CXX:-/usr/bin/g++}"
NVCC_VERSION_TAG="V13.0.88"

# Exact pins, with the sha256 of the manylinux x86_64 wheels (pip --require-hashes).
REQUIREMENTS="$(cat <<'EOF'
nvidia-cuda-nvcc==13.0.88 --hash=sha256:56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03
nvidia-nvvm==13.0.88 --hash=sha256:c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0
nvidia-cuda-crt==13.0.88 --hash=sha256:2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4
nvidia-cuda-runtime==13.0.96 --hash=sha256:7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548
nvidia-cuda-cccl==13.0.85 --hash=sha256:e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649
EOF
)"
LAYOUT_VERSION="layout=1"
STAMP_CONTENT="$LAYOUT_VERSION
$REQUIREMENTS"

log() { printf '[install-cuda-toolchain] %s\n' "$*" >&2; }
die() { printf '[install-cuda-toolchain] ERROR: %s\n' "$*" >&2; exit 1; }

FORCE=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $arg (try --help)" ;;
    esac
done

# check_tree DIR: succeeds if DIR holds a complete, working install with the
# current stamp. Cheap (a few stats + `nvcc --version`).
check_tree() {
    local d="$1"
    [[ -f "$d/$STAMP_NAME" ]] || return 1
    [[ "$(cat "$d/$STAMP_NAME")" == "$STAMP_CONTENT" ]] || return 1
    local f
    for f in bin/nvcc bin/ptxas home/nvvm/bin/cicc; do
        [[ -x "$d/$f" ]] || return 1
    done
    for f in home/include/cuda_runtime.h home/include/cuda_bf16.h home/include/cuda_fp16.h \
             home/include/crt/host_defines.h home/nvvm/libdevice/libdevice.10.bc; do
        [[ -f "$d/$f" ]] || return 1
    done
    local ver
    ver="$("$d/bin/nvcc" --version 2>/dev/null)" || return 1
    [[ "$ver" == *"$NVCC_VERSION_TAG"* ]] || return 1
}

# Fast path (no lock needed: a good tree is only ever replaced atomically).
if [[ "$FORCE" -eq 0 ]] && check_tree "$DEST"; then
    log "already installed ($NVCC_VERSION_TAG); nothing to do"
    echo "$DEST/bin/nvcc"
    exit 0
fi

[[ "$(uname -s)" == "Linux" && "$(uname -m)" == "x86_64" ]] \
    || die "only Linux x86_64 is supported (pinned wheel hashes are for manylinux x86_64); got $(uname -s) $(uname -m)"
command -v "$PYTHON" >/dev/null 2>&1 || die "python interpreter '$PYTHON' not found (set PYTHON=...)"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "'$PYTHON -m pip' is not available"
[[ -x "$HOST_CXX" ]] || die "host C++ compiler '$HOST_CXX' not found (set CUDA_HOST_CXX=...)"

mkdir -p "$TOOLCHAIN_DIR"
# Serialize concurrent installers.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$TOOLCHAIN_DIR/.cuda.lock"
    flock 9
    # Another process may have finished the job while we waited.
    if [[ "$FORCE" -eq 0 ]] && check_tree "$DEST"; then
        log "already installed (by a concurrent run); nothing to do"
        echo "$DEST/bin/nvcc"
        exit 0
    fi
fi

# Remove leftovers of interrupted runs, then stage into a fresh temp dir.
rm -rf "$TOOLCHAIN_DIR"/cuda.tmp.* "$TOOLCHAIN_DIR"/cuda.old.*
STAGE="$(mktemp -d "$TOOLCHAIN_DIR/cuda.tmp.XXXXXX")"
chmod 755 "$STAGE"
cleanup() { rm -rf "$STAGE"; }
trap cleanup EXIT

start=$SECONDS
log "installing pinned CUDA 13.0 wheels into $DEST ..."
printf '%s\n' "$REQUIREMENTS" > "$STAGE/requirements.txt"
PIP_LOG="$STAGE/pip.log"
if ! PIP_DISABLE_PIP_VERSION_CHECK=1 "$PYTHON" -m pip install \
        --no-deps --only-binary=:all: --require-hashes --no-compile \
        --no-warn-script-location --root-user-action=ignore \
        --target "$STAGE/site" -r "$STAGE/requirements.txt" >"$PIP_LOG" 2>&1; then
    cat "$PIP_LOG" >&2
    die "pip install failed (see output above)"
fi
rm -f "$STAGE/requirements.txt" "$PIP_LOG"

CU="$STAGE/site/nvidia/cu13"
for f in bin/nvcc bin/ptxas nvvm/bin/cicc include/cuda_runtime.h include/cuda_bf16.h \
         include/cuda_fp16.h lib/libcudart.so.13; do
    [[ -e "$CU/$f" ]] || die "unexpected wheel layout: missing nvidia/cu13/$f"
done

# CUDA_HOME-like tree. nvcc reads bin/nvcc.profile relative to its *real*
# location (it does not resolve a symlinked nvcc binary), so we expose it via
# a symlinked bin/ directory: <dest>/bin/nvcc -> home/bin/nvcc, where
# <dest>/bin/.. resolves physically to nvidia/cu13.
ln -s lib "$CU/lib64"                           # nvcc.profile links from lib64
ln -s libcudart.so.13 "$CU/lib/libcudart.so"    # allow -lcudart
ln -s site/nvidia/cu13 "$STAGE/home"
ln -s home/bin "$STAGE/bin"
printf '%s\n' "$STAMP_CONTENT" > "$STAGE/$STAMP_NAME"

# Smoke test: bf16/fp16 kernel -> PTX (compute_80) -> SASS (sm_80).
TEST_DIR="$(mktemp -d)"
trap 'cleanup; rm -rf "$TEST_DIR"' EXIT
cat > "$TEST_DIR/smoke.cu" <<'EOF'
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
extern "C" __global__ void smoke(const __nv_bfloat16* x, __half* y, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __float2half(__bfloat162float(x[i]) * a + __half2float(y[i]));
}
EOF
if ! "$STAGE/bin/nvcc" -ccbin "$HOST_CXX" -ptx -arch=compute_80 -o "$TEST_DIR/smoke.ptx" "$TEST_DIR/smoke.cu" >"$TEST_DIR/log" 2>&1 \
   || ! "$STAGE/bin/ptxas" -arch=sm_80 -o /dev/null "$TEST_DIR/smoke.ptx" >>"$TEST_DIR/log" 2>&1; then
    cat "$TEST_DIR/log" >&2
    die "smoke test (nvcc -ptx / ptxas) failed with the freshly installed toolchain"
fi
check_tree "$STAGE" || die "installed tree failed verification"

# Atomically swap into place.
if [[ -e "$DEST" || -L "$DEST" ]]; then
    OLD="$TOOLCHAIN_DIR/cuda.old.$$"
    mv "$DEST" "$OLD"
    mv "$STAGE" "$DEST"
    rm -rf "$OLD"
else
    mv "$STAGE" "$DEST"
fi
check_tree "$DEST" || die "installed tree at $DEST failed verification after move"

log "done in $((SECONDS - start))s; CUDA_HOME=$DEST/home ($(du -sh "$DEST" | cut -f1))"
echo "$DEST/bin/nvcc"

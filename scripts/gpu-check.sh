#!/usr/bin/env bash
# The one-command GPU check, in two halves.
#
#   scripts/gpu-check.sh stage        # HERE (Rust machine): build and stage everything a GPU
#                                     # machine needs into .gpu/ (ignored, < 64 MiB): release
#                                     # binaries, test and bench executables, this script.
#   .gpu/gpu-check.sh run OUT_DIR     # THERE (CUDA 13 driver, no Rust): runs every test
#                                     # executable (GPU tests included; the simulator-vs-GPU
#                                     # self-test is among them), compute-sanitizer memcheck and
#                                     # racecheck over the kernel tests, short benchmarks, and
#                                     # writes OUT_DIR/gpu-check.md (table) + OUT_DIR/gpu-check.log.
#
# With the device tool: stage here, then run with carry [".gpu"] and the command
#   bash .gpu/gpu-check.sh run "$OUT"
set -euo pipefail

mode="${1:-}"
case "$mode" in
stage)
    cd "$(dirname "${BASH_SOURCE[0]}")/.."
    scripts/install-cuda-toolchain.sh >/dev/null
    export RECFORGE_REQUIRE_KERNELS=1
    rm -rf .gpu && mkdir -p .gpu/tests .gpu/benches .gpu/bin
    cargo build --release --bins
    # Test and bench executables: cargo prints their paths as JSON artifacts.
    list=$(cargo test --release --no-run --message-format=json 2>/dev/null |
        python3 -c 'import sys, json
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        kind = m["target"]["kind"][0]
        name = m["target"]["name"] if kind == "test" else kind + "-" + m["target"]["name"]
        print(name, m["executable"])')
    while read -r name exe; do
        [ -n "$name" ] && cp "$exe" ".gpu/tests/$name"
    done <<<"$list"
    benches=$(cargo bench --no-run --message-format=json 2>/dev/null |
        python3 -c 'import sys, json
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])')
    while read -r name exe; do
        [ -n "$name" ] && cp "$exe" ".gpu/benches/$name"
    done <<<"$benches"
    cp target/release/recforge .gpu/bin/
    cp "${BASH_SOURCE[0]}" .gpu/gpu-check.sh
    cp scripts/peer_int8_mm.py .gpu/
    # Debug info is most of the size; the device tool carries at most 64 MiB.
    find .gpu -type f -perm -u+x ! -name '*.sh' -exec strip --strip-debug {} +
    git rev-parse HEAD >.gpu/COMMIT 2>/dev/null || true
    size=$(du -sm .gpu | cut -f1)
    echo "staged .gpu/ ($size MiB): $(ls .gpu/tests | tr '\n' ' ')"
    if [ "$size" -ge 64 ]; then
        echo "error: .gpu/ is $size MiB, over the 64 MiB the device tool carries" >&2
        exit 1
    fi
    ;;
run)
    out="${2:?usage: gpu-check.sh run OUT_DIR}"
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    mkdir -p "$out"
    log="$out/gpu-check.log"
    md="$out/gpu-check.md"
    : >"$log"
    say() { echo "$*" | tee -a "$log"; }
    # The tests read assets and kernels relative to the repository root.
    cd "$here/.."
    gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi")
    {
        echo "# GPU check — $(date -u +%Y-%m-%dT%H:%MZ)"
        echo
        echo "- commit: $(cat "$here/COMMIT" 2>/dev/null || echo unknown)"
        echo "- device: $gpu"
        echo
        echo "| step | result | seconds |"
        echo "|---|---|---|"
    } >"$md"
    step() { # name, command...
        local name="$1"
        shift
        local t0=$SECONDS rc=0
        say "=== $name: $*"
        "$@" >>"$log" 2>&1 || rc=$?
        local res="ok"
        [ $rc -ne 0 ] && res="FAILED (exit $rc)"
        echo "| $name | $res | $((SECONDS - t0)) |" >>"$md"
        say "=== $name: $res"
    }
    for t in "$here"/tests/*; do
        step "test $(basename "$t")" "$t" --test-threads=4
    done
    if command -v compute-sanitizer >/dev/null 2>&1; then
        for tool in memcheck racecheck; do
            for t in kernels simulator; do
                # The planted-bug kernels run only on the simulator, so the GPU runs are clean.
                step "compute-sanitizer $tool ($t)" compute-sanitizer --tool "$tool" --error-exitcode 1 "$here/tests/$t" --test-threads=1
            done
        done
    else
        echo "| compute-sanitizer | skipped: not on PATH | 0 |" >>"$md"
    fi
    if command -v python3 >/dev/null 2>&1; then
        step "peer: torch._int_mm (cuBLASLt int8)" python3 "$here/peer_int8_mm.py"
    fi
    for b in "$here"/benches/*; do
        step "bench $(basename "$b")" "$b" --bench --warm-up-time 1 --measurement-time 3
    done
    {
        echo
        echo "## Benchmark lines"
        echo
        echo '```'
        grep -E "time:|thrpt:|^[a-z_]+/|^peer_int8_mm" "$log" | grep -v "^===" || true
        echo '```'
        echo
        echo "## Skips reported by tests"
        echo
        echo '```'
        grep -E "^skipped:" "$log" | sort | uniq -c || true
        echo '```'
    } >>"$md"
    cat "$md"
    ! grep -q FAILED "$md"
    ;;
*)
    echo "usage: scripts/gpu-check.sh stage | run OUT_DIR" >&2
    exit 2
    ;;
esac

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
#                                     # It ends with the training comparison (below).
#   .gpu/gpu-check.sh run-train OUT_DIR   # THERE: only the training comparison: bench-train on
#                                     # CUDA at LLaMA-7B shapes, batch 4 × seq 1024, ITREK LoRA
#                                     # (r 16 on q,k,v,o), and scripts/peer_train.py (HF PEFT, bf16
#                                     # and bitsandbytes 8-bit bases) with the same settings; writes
#                                     # OUT_DIR/bench-train.json and OUT_DIR/peer-train.json and a
#                                     # summary in OUT_DIR/gpu-check.md. Each side runs under
#                                     # `timeout` (TRAIN_TIMEOUT seconds, default 240), so the pair
#                                     # stays within one 10-minute device call.
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
        # The CPU-only end-to-end TALLRec test (minutes, real assets) is not a GPU check.
        [ "$name" = tallrec_smollm2 ] && continue
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
    cp target/release/recforge target/release/bench-train .gpu/bin/
    cp "${BASH_SOURCE[0]}" .gpu/gpu-check.sh
    cp scripts/peer_int8_mm.py scripts/peer_train.py scripts/peer_sampling.py .gpu/
    # Debug info is most of the size; the device tool carries at most 64 MiB. Stripped, the
    # executables are still over 100 MiB, so they travel as one gzip archive (about a third of
    # that), which `run` unpacks next to this script.
    find .gpu -type f -perm -u+x ! -name '*.sh' ! -name '*.py' -exec strip --strip-debug {} +
    git rev-parse HEAD >.gpu/COMMIT 2>/dev/null || true
    staged_tests=$(ls .gpu/tests | tr '\n' ' ')
    tar -C .gpu -czf .gpu/payload.tar.gz tests benches bin
    rm -rf .gpu/tests .gpu/benches .gpu/bin
    size=$(du -sm .gpu | cut -f1)
    echo "staged .gpu/ ($size MiB; executables in payload.tar.gz): $staged_tests"
    if [ "$size" -ge 64 ]; then
        echo "error: .gpu/ is $size MiB, over the 64 MiB the device tool carries" >&2
        exit 1
    fi
    ;;
run | run-train)
    out="${2:?usage: gpu-check.sh run|run-train OUT_DIR}"
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    if [ -f "$here/payload.tar.gz" ] && [ ! -d "$here/tests" ]; then
        tar -C "$here" -xzf "$here/payload.tar.gz"
    fi
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
    # The training comparison (DESIGN.md §6): recforge vs HF PEFT on the same shapes.
    train_compare() {
        local limit="${TRAIN_TIMEOUT:-240}"
        local args=(--batch 4 --seq 1024 --accum 1 --r 16 --targets q,k,v,o)
        rm -f "$out/bench-train.json" "$out/peer-train.json"
        step "bench-train llama-7b 4×1024 itrek (cuda)" timeout -k 10 "$limit" \
            "$here/bin/bench-train" --device cuda --model llama-7b --preset itrek "${args[@]}" \
            --warmup 2 --steps 5 --time-limit "$((limit - 90))" --json "$out/bench-train.json"
        if command -v python3 >/dev/null 2>&1; then
            # The peer stops starting new work at its own budget, before `timeout` would kill it.
            step "peer: HF PEFT LoRA llama-7b 4×1024 (bf16, bnb int8)" timeout -k 10 "$limit" \
                python3 "$here/peer_train.py" "${args[@]}" --alpha 16 --dropout 0.05 \
                --warmup 1 --steps 3 --time-budget "$((limit - 30))" --json "$out/peer-train.json"
        else
            echo "| peer: HF PEFT LoRA | skipped: no python3 | 0 |" >>"$md"
        fi
        {
            echo
            echo "## Training throughput (LLaMA-7B shapes, batch 4 × 1024, LoRA r 16 on q,k,v,o)"
            echo
            python3 - "$out/bench-train.json" "$out/peer-train.json" <<'PY' || echo "(no summary: python3 failed)"
import json, sys
def load(p):
    try:
        return json.load(open(p))
    except Exception as e:
        return {"error": f"{p}: {e}"}
b, p = load(sys.argv[1]), load(sys.argv[2])
print("| run | tokens/s | ms/step | peak memory | note |")
print("|---|---|---|---|---|")
gib = lambda x: f"{x / 2**30:.2f} GiB" if isinstance(x, (int, float)) else "n/a"
if "tokens_per_sec" in b:
    m = b["memory"]
    mfu = f"MFU {b['mfu'] * 100:.1f}%" if b.get("mfu") is not None else b.get("mfu_note", "")
    print(f"| recforge bench-train ({b['device']}) | {b['tokens_per_sec']:.0f} | {b['step_ms']['total']:.1f} | "
          f"{gib(m.get('measured_bytes'))} (plan {gib(m.get('plan_total_bytes'))}) | {mfu} |")
else:
    print(f"| recforge bench-train | — | — | — | {b.get('error', 'no result (see the log)')} |")
for mode, r in (p.get("runs") or {}).items():
    if r.get("status") == "ok":
        ratio = ""
        if "tokens_per_sec" in b:
            ratio = f"recforge / this = {b['tokens_per_sec'] / r['tokens_per_sec']:.2f}×"
        print(f"| HF PEFT {mode} base | {r['tokens_per_sec']:.0f} | {r['step_ms']:.1f} | "
              f"{gib(r.get('peak_memory_allocated_bytes'))} | {ratio} |")
    else:
        print(f"| HF PEFT {mode} base | — | — | — | {r.get('status')}: {r.get('error') or r.get('note')} |")
if not p.get("runs"):
    print(f"| HF PEFT | — | — | — | {p.get('error', 'no result (see the log)')} |")
PY
        } >>"$md"
    }
    if [ "$mode" = run-train ]; then
        train_compare
        cat "$md"
        ! grep -q FAILED "$md"
        exit
    fi
    for t in "$here"/tests/*; do
        step "test $(basename "$t")" "$t" --test-threads=4
    done
    if command -v compute-sanitizer >/dev/null 2>&1; then
        for tool in memcheck racecheck; do
            for t in kernels simulator kernels_attention kernels_paged kernels_sampling; do
                # The planted-bug kernels run only on the simulator, so the GPU runs are clean.
                # The shared-memory-heavy kernels (tiled attention, paged decode, sampling) are
                # checked for races and out-of-bounds accesses too; each run is capped.
                step "compute-sanitizer $tool ($t)" timeout -k 10 180 compute-sanitizer --tool "$tool" --error-exitcode 1 "$here/tests/$t" --test-threads=1
            done
        done
    else
        echo "| compute-sanitizer | skipped: not on PATH | 0 |" >>"$md"
    fi
    if command -v python3 >/dev/null 2>&1; then
        step "peer: torch._int_mm (cuBLASLt int8)" python3 "$here/peer_int8_mm.py"
        step "peer: sort-based sampling (PyTorch)" python3 "$here/peer_sampling.py"
    fi
    for b in "$here"/benches/*; do
        step "bench $(basename "$b")" "$b" --bench --warm-up-time 1 --measurement-time 3
    done
    train_compare
    {
        echo
        echo "## Benchmark lines"
        echo
        echo '```'
        grep -E "time:|thrpt:|^[a-z_]+/|^peer_int8_mm|^peer_sampling" "$log" | grep -v "^===" || true
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
    echo "usage: scripts/gpu-check.sh stage | run OUT_DIR | run-train OUT_DIR" >&2
    exit 2
    ;;
esac

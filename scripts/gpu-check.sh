#!/usr/bin/env bash
# The one-command GPU check, in two halves.
#
#   scripts/gpu-check.sh stage        # HERE (Rust machine): build and stage everything a GPU
#                                     # machine needs into .gpu/ (ignored, < 64 MiB): release
#                                     # binaries, test and bench executables, this script,
#                                     # and bitsandbytes for the training peer (downloaded
#                                     # from PyPI; skipped with a note when it cannot be).
#   .gpu/gpu-check.sh run OUT_DIR     # THERE (CUDA 13 driver, no Rust): in priority order,
#                                     # (tests) every test executable's CUDA half (the
#                                     # simulator-vs-GPU self-test first; the simulator halves
#                                     # are CI's; one that fails runs again one test at
#                                     # a time with CUDA_LAUNCH_BLOCKING=1, so a kernel's
#                                     # fault is reported by its own launch), (train) the
#                                     # training comparison below,
#                                     # (peers) cuBLASLt int8 and sort-based sampling peers,
#                                     # (benches) short criterion runs, (sanitizer)
#                                     # compute-sanitizer memcheck + racecheck over the kernel
#                                     # tests. Writes OUT_DIR/gpu-check.md (table, appended step by
#                                     # step, so a run cut short still reports) and
#                                     # OUT_DIR/gpu-check.log.
#                                     # GPU_CHECK_BUDGET (seconds, default 520) bounds the whole
#                                     # run so it fits one device call, and a 15-minute lease
#                                     # with the machine's start: a step gets at most what is
#                                     # left, and steps that no longer fit are listed as not
#                                     # run. The tests phase stops starting tests after
#                                     # GPU_CHECK_TESTS_BUDGET (default 150) seconds, so the
#                                     # training comparison always gets its turn.
#                                     # GPU_CHECK_PHASES (default
#                                     # "tests train peers benches sanitizer") picks phases, e.g.
#                                     # "benches sanitizer" for a second call; the phase
#                                     # "tiles" (not a default) runs bench-train once more with
#                                     # the 64 × 64 GEMM tiles forced, for the 128 tiles' effect;
#                                     # "wg" (not a default) runs it with the Hopper wgmma tiles
#                                     # forced (RECFORGE_W8A8_TILE=wg RECFORGE_DX_TILE=wg), for
#                                     # their effect; "loraup" (not a default) runs it with the
#                                     # LoRA up-projection in the GEMM's epilogue
#                                     # (RECFORGE_LORA_UP=epilogue) instead of its own pass.
#   .gpu/gpu-check.sh run-train OUT_DIR   # THERE: only the training comparison: bench-train on
#                                     # CUDA at LLaMA-7B shapes, batch 4 × seq 1024, ITREK LoRA
#                                     # (r 16 on q,k,v,o), and scripts/peer_train.py (HF PEFT: bf16
#                                     # base with and without checkpointing, bitsandbytes 8-bit
#                                     # base) with the same settings; writes
#                                     # OUT_DIR/bench-train.json and OUT_DIR/peer-train.json and a
#                                     # summary in OUT_DIR/gpu-check.md. The three runs get
#                                     # 120, 180 and 90 s (TRAIN_TIMEOUT, if set, gives each the
#                                     # same), about 6.5 minutes together at most.
#
# With the device tool: stage here, then run with carry [".gpu"] and the command
#   bash .gpu/gpu-check.sh run "$OUT"
set -euo pipefail

# The bitsandbytes the training peer's 8-bit base runs on (staged into .gpu/pylib).
BNB_VERSION=0.50.2
# Test executables with no device half (no `common::devices()`, no Gpu backend, every CLI
# run on --device cpu), left out of the staged payload.
CPU_ONLY_TESTS="adapter bad_input examples fuzz_inputs ggml_quants llama_cpp_vocab model rec_cli rec_data rec_prune tallrec_smollm2"

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
        # Tests that never touch a device (file readers, CPU-only CLI runs, the minutes-long
        # CPU TALLRec run) are not GPU checks: CI runs them; they would only take space
        # here and time there.
        case " $CPU_ONLY_TESTS " in *" $name "*) continue ;; esac
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
    # bitsandbytes, for the training peer's 8-bit base: the GPU machine's image has PyTorch,
    # transformers and peft but not it, and nothing can be installed there. The pinned wheel
    # from PyPI, keeping only its CPU and CUDA 13 libraries (that image's PyTorch is cu130):
    # ~8 MiB instead of 130. Best effort: without it the peer's int8 mode reports "skipped".
    mkdir -p .gpu/pylib
    whl=$(mktemp -d)
    if python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_24_x86_64 \
        --python-version 3.12 -d "$whl" "bitsandbytes==$BNB_VERSION" >/dev/null 2>&1; then
        python3 - "$whl"/bitsandbytes-*.whl .gpu/pylib <<'PY'
import re, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
for n in z.namelist():
    if n.endswith(".so") and not re.search(r"/libbitsandbytes_(cpu|cuda13\d+)\.so$", n):
        continue
    z.extract(n, sys.argv[2])
PY
    else
        echo "note: could not download bitsandbytes $BNB_VERSION; the peer's int8 base will be skipped" >&2
    fi
    rm -rf "$whl"
    # Debug info is most of the size; the device tool carries at most 64 MiB. Stripped, the
    # executables are still over 350 MiB, so they travel as one xz archive, which `run` unpacks
    # next to this script (with python3's tarfile where there is no xz). Every executable links
    # the same library, so a dictionary that spans the whole archive finds one copy of it in
    # the next: 357 MiB packed to 19 MiB with 256 MiB (2026-12-07), against 58 MiB with xz -6's
    # 8 MiB (gzip: 61 MiB at 2026-12-06's smaller payload). One thread: xz would drop to one
    # anyway to stay under its memory limit; unpacking needs 256 MiB.
    find .gpu -type f -perm -u+x ! -name '*.sh' ! -name '*.py' -exec strip --strip-debug {} +
    git rev-parse HEAD >.gpu/COMMIT 2>/dev/null || true
    staged_tests=$(ls .gpu/tests | tr '\n' ' ')
    tar -C .gpu -cf - tests benches bin pylib | xz -T1 --lzma2=preset=6,dict=256MiB >.gpu/payload.tar.xz
    rm -rf .gpu/tests .gpu/benches .gpu/bin .gpu/pylib
    size=$(du -sm .gpu | cut -f1)
    echo "staged .gpu/ ($size MiB; executables in payload.tar.xz): $staged_tests"
    if [ "$size" -ge 64 ]; then
        echo "error: .gpu/ is $size MiB, over the 64 MiB the device tool carries" >&2
        exit 1
    fi
    ;;
run | run-train)
    out="${2:?usage: gpu-check.sh run|run-train OUT_DIR}"
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    if [ -f "$here/payload.tar.xz" ] && [ ! -d "$here/tests" ]; then
        if command -v xz >/dev/null 2>&1; then
            tar -C "$here" -xJf "$here/payload.tar.xz"
        else
            python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
                "$here/payload.tar.xz" "$here"
        fi
    fi
    # The staged bitsandbytes (see stage), for the training peer's 8-bit base.
    if [ -d "$here/pylib" ]; then
        export PYTHONPATH="$here/pylib${PYTHONPATH:+:$PYTHONPATH}"
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
    budget="${GPU_CHECK_BUDGET:-520}"
    phases="${GPU_CHECK_PHASES:-tests train peers benches sanitizer}"
    t_start=$SECONDS
    left() { echo $((budget - (SECONDS - t_start))); }
    step() { # name, cap in seconds, command...
        local name="$1" cap="$2"
        shift 2
        local remaining
        remaining=$(left)
        if [ "$remaining" -lt 20 ]; then
            echo "| $name | not run: the ${budget} s budget is spent | 0 |" >>"$md"
            say "=== $name: not run (budget)"
            last_rc=0
            return 0
        fi
        local lim=$((remaining - 10 < cap ? remaining - 10 : cap))
        local t0=$SECONDS rc=0
        say "=== $name (limit ${lim} s): $*"
        timeout -k 5 "$lim" "$@" >>"$log" 2>&1 || rc=$?
        local res="ok"
        if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
            res="FAILED (timed out after ${lim} s)"
        elif [ $rc -ne 0 ]; then
            res="FAILED (exit $rc)"
        fi
        echo "| $name | $res | $((SECONDS - t0)) |" >>"$md"
        say "=== $name: $res"
        last_rc=$rc
    }
    want() { case " $phases " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
    # The CUDA halves only (CI runs the simulator halves), and every core for what the
    # simulator still runs (tests that compare it with the hardware).
    # (RECFORGE_TEST_DEVICES= set empty runs both halves, e.g. to try this script without a GPU.)
    export RECFORGE_TEST_DEVICES="${RECFORGE_TEST_DEVICES-cuda}"
    # A hardware wgmma self-test that fails writes its whole output here (tests/simulator.rs).
    export RECFORGE_TEST_DUMP="$out/dumps"
    RF_SIM_THREADS="$(nproc 2>/dev/null || echo 4)"
    export RF_SIM_THREADS
    # The training comparison (DESIGN.md §6): recforge vs HF PEFT on the same shapes.
    train_compare() {
        local l_auto="${TRAIN_TIMEOUT:-120}" l_peer="${TRAIN_TIMEOUT:-180}" l_all="${TRAIN_TIMEOUT:-90}"
        local args=(--batch 4 --seq 1024 --accum 1 --r 16 --targets q,k,v,o)
        rm -f "$out/bench-train.json" "$out/peer-train.json" "$out/bench-train-ckpt-all.json"
        # Default checkpointing (auto: the 24 GiB plan keeps most layers' activations). The
        # measurement stops after at least one step once --time-limit is reached, leaving time
        # for building the random 7B model (host) and its upload.
        step "bench-train llama-7b 4×1024 itrek (cuda)" "$l_auto" \
            "$here/bin/bench-train" --device cuda --model llama-7b --preset itrek "${args[@]}" \
            --warmup 2 --steps 5 --time-limit "$((l_auto / 2))" --profile --json "$out/bench-train.json"
        if command -v python3 >/dev/null 2>&1; then
            # The peer stops starting new work at its own budget, before `timeout` would kill it.
            # Its usual recipe (bf16 base, checkpointing on), then at its fastest (no
            # checkpointing, which fits an 80 GB GPU), then the bitsandbytes 8-bit base.
            step "peer: HF PEFT LoRA llama-7b 4×1024 (bf16, bf16 without checkpointing, bnb int8)" "$l_peer" \
                python3 "$here/peer_train.py" "${args[@]}" --alpha 16 --dropout 0.05 \
                --modes bf16,bf16-nockpt,int8 \
                --warmup 1 --steps 3 --time-budget "$(($(left) - 10 < l_peer ? $(left) - 30 : l_peer - 20))" --json "$out/peer-train.json"
        else
            echo "| peer: HF PEFT LoRA | skipped: no python3 | 0 |" >>"$md"
        fi
        # The same algorithm as the peer: every layer recomputes.
        step "bench-train llama-7b 4×1024 itrek --checkpointing on (cuda)" "$l_all" \
            "$here/bin/bench-train" --device cuda --model llama-7b --preset itrek "${args[@]}" \
            --checkpointing on --warmup 1 --steps 3 --time-limit "$((l_all / 2))" \
            --json "$out/bench-train-ckpt-all.json"
        {
            echo
            echo "## Training throughput (LLaMA-7B shapes, batch 4 × 1024, LoRA r 16 on q,k,v,o)"
            echo
            python3 - "$out/bench-train.json" "$out/peer-train.json" "$out/bench-train-ckpt-all.json" <<'PY' || echo "(no summary: python3 failed)"
import json, sys
def load(p):
    try:
        return json.load(open(p))
    except Exception as e:
        return {"error": f"{p}: {e}"}
b, p, ball = load(sys.argv[1]), load(sys.argv[2]), load(sys.argv[3])
print("| run | tokens/s | ms/step | peak memory | note |")
print("|---|---|---|---|---|")
def buffers(m):
    bu = m.get("buffers") or {}
    if not bu:
        return ""
    arena = f", arena {gib(bu.get('arena_bytes'))}" if bu.get("arena_bytes") else ", no arena"
    return (f"; buffers peak {gib(bu.get('peak_bytes'))} ({bu.get('peak_over_plan', 0):.3f} of the plan{arena}, "
            f"{bu.get('device_allocations_during_steps')} device allocations in the steps)")
gib = lambda x: f"{x / 2**30:.2f} GiB" if isinstance(x, (int, float)) else "n/a"
for run in (b, ball):
    if "tokens_per_sec" in run:
        m = run["memory"]
        mfu = f"MFU {run['mfu'] * 100:.1f}%" if run.get("mfu") is not None else run.get("mfu_note", "")
        ck = run.get("config", {}).get("recomputed_layers")
        print(f"| recforge bench-train ({run['device']}; {ck} layers recompute) | {run['tokens_per_sec']:.0f} | "
              f"{run['step_ms']['total']:.1f} | driver {gib(m.get('measured_bytes'))} "
              f"(plan {gib(m.get('plan_total_bytes'))}{buffers(m)}) | {mfu} |")
    else:
        print(f"| recforge bench-train | — | — | — | {run.get('error', 'no result (see the log)')} |")
for mode, r in (p.get("runs") or {}).items():
    if r.get("status") == "ok":
        ratio = ""
        if "tokens_per_sec" in b:
            ratio = f"recforge / this = {b['tokens_per_sec'] / r['tokens_per_sec']:.2f}×"
        ck = "checkpointing on" if r.get("checkpointing", True) else "no checkpointing"
        print(f"| HF PEFT {mode} base ({ck}) | {r['tokens_per_sec']:.0f} | {r['step_ms']:.1f} | "
              f"{gib(r.get('peak_memory_allocated_bytes'))} | {ratio} |")
    else:
        print(f"| HF PEFT {mode} base | — | — | — | {r.get('status')}: {r.get('error') or r.get('note')} |")
if not p.get("runs"):
    print(f"| HF PEFT | — | — | — | {p.get('error', 'no result (see the log)')} |")
prof = b.get("profile") if isinstance(b, dict) else None
if prof:
    print()
    print(f"Where one more step's time went (bench-train --profile, {prof['timer']}): "
          f"{prof['timed_ms']:.1f} ms timed of {prof['step_wall_ms']:.1f} ms wall, {prof['operations']} operations.")
    print()
    print("| operation | launches | ms | share of timed |")
    print("|---|---|---|---|")
    for k in prof["kernels"][:15]:
        print(f"| {k['name']} | {k['launches']} | {k['ms']:.2f} | {k['share_of_timed'] * 100:.1f}% |")
PY
            # The steps that follow get a table of their own.
            echo
            echo "| step | result | seconds |"
            echo "|---|---|---|"
        } >>"$md"
    }
    if [ "$mode" = run-train ]; then
        train_compare
        cat "$md"
        ! grep -q FAILED "$md"
        exit
    fi
    if want tests; then
        # Hardware first: the simulator-vs-GPU self-test and the kernel tests, then the rest.
        first="simulator kernels kernels_linear kernels_elementwise kernels_train kernels_attention attention_saved kernels_paged kernels_sampling gpu_backend device_arena memory_plan train bench_train"
        rest=""
        for t in "$here"/tests/*; do
            case " $first " in *" $(basename "$t") "*) ;; *) rest="$rest $(basename "$t")" ;; esac
        done
        tests_budget="${GPU_CHECK_TESTS_BUDGET:-150}"
        t_tests=$SECONDS
        for n in $first $rest; do
            [ -x "$here/tests/$n" ] || continue
            if [ $((SECONDS - t_tests)) -ge "$tests_budget" ]; then
                echo "| test $n | not run: the tests' ${tests_budget} s are spent | 0 |" >>"$md"
                continue
            fi
            step "test $n" 120 "$here/tests/$n" --test-threads=4
            # One kernel's fault (an illegal address) is sticky: every test sharing the context
            # fails after it under whichever call noticed. Once more, one test at a time with
            # each launch waited for, so the first failing launch names its kernel.
            if [ "$last_rc" -ne 0 ] && [ "$last_rc" -ne 124 ] && [ "$last_rc" -ne 137 ] &&
                [ $((SECONDS - t_tests)) -lt "$tests_budget" ]; then
                step "test $n again: one thread, CUDA_LAUNCH_BLOCKING=1" 60 \
                    env CUDA_LAUNCH_BLOCKING=1 "$here/tests/$n" --test-threads=1
            fi
        done
    fi
    want train && train_compare
    # compare_train LABEL JSON: one line of tokens/s, the run in JSON against the train phase's
    # default tiles (bench-train.json), with their ratio; then a fresh step table.
    compare_train() {
        python3 - "$1" "$2" "$out/bench-train.json" >>"$md" <<'PY' || true
import json, sys
def tps(p):
    try:
        return json.load(open(p))["tokens_per_sec"]
    except Exception:
        return None
label, a, b = sys.argv[1], tps(sys.argv[2]), tps(sys.argv[3])
print()
print(f"{label}: {a and round(a)} tokens/s; default tiles (train phase): {b and round(b)} tokens/s"
      + (f"; this run / default = {a / b:.2f}×" if a and b else ""))
print()
print("| step | result | seconds |")
print("|---|---|---|")
PY
    }
    if want tiles; then
        # Not in the default phases: the training run once more with the 64 × 64 GEMM tiles
        # forced (the kernels before 2026-12-06), for the step-level effect of the 128 tiles.
        step "bench-train llama-7b 4×1024 itrek, 64 tiles forced (cuda)" 120 \
            env RECFORGE_W8A8_TILE=64 RECFORGE_DX_TILE=64 "$here/bin/bench-train" --device cuda \
            --model llama-7b --preset itrek --batch 4 --seq 1024 --accum 1 --r 16 --targets q,k,v,o \
            --warmup 2 --steps 5 --time-limit 60 --json "$out/bench-train-t64.json"
        compare_train "64 tiles forced" "$out/bench-train-t64.json"
    fi
    if want wg; then
        # Not in the default phases: the training run with the W8A8 forward and the int8 dX on
        # the wgmma tiles (sm_90 only; opt-in until measured), against the train phase's tiles.
        step "bench-train llama-7b 4×1024 itrek, wgmma tiles (cuda)" 120 \
            env RECFORGE_W8A8_TILE=wg RECFORGE_DX_TILE=wg "$here/bin/bench-train" --device cuda \
            --model llama-7b --preset itrek --batch 4 --seq 1024 --accum 1 --r 16 --targets q,k,v,o \
            --warmup 2 --steps 5 --time-limit 60 --profile --json "$out/bench-train-wg.json"
        compare_train "wgmma tiles forced" "$out/bench-train-wg.json"
    fi
    if want loraup; then
        # Not in the default phases: the training run with the LoRA up-projection in the W8A8
        # GEMM's epilogue instead of lora_up_bf16 after it (which is the default until this
        # says otherwise; the prediction is in results/NOTES.md).
        step "bench-train llama-7b 4×1024 itrek, LoRA up in the epilogue (cuda)" 120 \
            env RECFORGE_LORA_UP=epilogue "$here/bin/bench-train" --device cuda \
            --model llama-7b --preset itrek --batch 4 --seq 1024 --accum 1 --r 16 --targets q,k,v,o \
            --warmup 2 --steps 5 --time-limit 60 --profile --json "$out/bench-train-loraup.json"
        compare_train "LoRA up-projection in the epilogue" "$out/bench-train-loraup.json"
    fi
    if want peers && command -v python3 >/dev/null 2>&1; then
        step "peer: torch._int_mm (cuBLASLt int8)" 90 python3 "$here/peer_int8_mm.py"
        step "peer: sort-based sampling (PyTorch)" 60 python3 "$here/peer_sampling.py"
    fi
    if want benches; then
        for b in "$here"/benches/*; do
            # 10 samples: a 7B-shape GEMM at 100 would stretch each case past its 1 s. Only the
            # cuda_* groups: the cpu_* ones are this machine's business, not the GPU's.
            step "bench $(basename "$b")" 90 "$b" --bench --warm-up-time 0.5 --measurement-time 1 --sample-size 10 cuda_
        done
    fi
    if want sanitizer; then
        if command -v compute-sanitizer >/dev/null 2>&1; then
            for tool in memcheck racecheck; do
                for t in kernels simulator kernels_linear kernels_attention kernels_paged kernels_sampling; do
                    # The planted-bug kernels run only on the simulator, so the GPU runs are
                    # clean. The shared-memory-heavy kernels (the pipelined GEMMs, tiled
                    # attention, paged decode, sampling) are checked for races and
                    # out-of-bounds accesses too.
                    step "compute-sanitizer $tool ($t)" 120 compute-sanitizer --tool "$tool" --error-exitcode 1 "$here/tests/$t" --test-threads=1
                done
            done
        else
            echo "| compute-sanitizer | skipped: not on PATH | 0 |" >>"$md"
        fi
    fi
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
        echo
        # On compute capability 9.0 every module loads as its embedded sm_90 cubin; one that
        # does not falls back to the driver's JIT of its PTX and says so (backend::gpu::cuda).
        echo "## Kernel modules"
        echo
        if grep -q "cubin did not load" "$log"; then
            echo '```'
            grep "cubin did not load" "$log" | sort | uniq -c
            echo '```'
        else
            echo "No fallback note in the log: on compute capability 9.0 every module loaded as its sm_90 cubin (elsewhere the PTX is used by design)."
        fi
    } >>"$md"
    cat "$md"
    ! grep -q FAILED "$md"
    ;;
*)
    echo "usage: scripts/gpu-check.sh stage | run OUT_DIR | run-train OUT_DIR" >&2
    exit 2
    ;;
esac

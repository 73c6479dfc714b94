#!/usr/bin/env bash
# The main job on the embedded default: TALLRec on MovieLens-100K with SmolLM2-135M-Instruct
# (a real LLaMA-architecture model, int8 base + LoRA). Builds the TALLRec samples, evaluates the
# base model's Yes/No AUC on a fixed slice of the validation split, LoRA-trains it on a
# few-shot training set, evaluates again, and leaves the adapter (PEFT format) in runs/demo/.
# Runs on a GPU when one is usable (`--device auto`), else on the CPU with sizes that finish in
# 2.5 to 4 minutes on 2 cores (2 min 24 s on 2026-12-04, 4 min 1 s on a slower day of the
# same VM, 2026-12-06); every size can be overridden:
#
#   DEMO_EVAL=128 DEMO_SHOTS=64 DEMO_STEPS=32 DEMO_LR=1e-3 DEVICE=auto scripts/demo.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-cuda-toolchain.sh >/dev/null
scripts/fetch-assets.sh >/dev/null
cargo build --release --quiet --bin recforge
R=./target/release/recforge
DEVICE=${DEVICE:-auto}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && [ "$DEVICE" != cpu ]; then
    big=1
else
    big=0
fi
EVAL=${DEMO_EVAL:-$([ $big = 1 ] && echo 1000 || echo 128)}
SHOTS=${DEMO_SHOTS:-$([ $big = 1 ] && echo 256 || echo 64)}
STEPS=${DEMO_STEPS:-$([ $big = 1 ] && echo 200 || echo 32)}
LR=${DEMO_LR:-1e-3}
OUT=runs/demo
mkdir -p "$OUT"

$R info
$R rec data tallrec --split train --samples "$SHOTS" --seed 0 --out "$OUT/train.json"
$R rec data tallrec --split valid --out "$OUT/valid.json"
echo "== before training: the base model's P(Yes) on the first $EVAL validation samples"
$R rec eval --data "$OUT/valid.json" --limit "$EVAL" --device "$DEVICE" --json "$OUT/before.json"
echo "== LoRA training on $SHOTS samples, $STEPS updates"
rm -rf "$OUT/adapter"
$R rec train --data "$OUT/train.json" --out "$OUT/adapter" --steps "$STEPS" --batch 4 --accum 1 \
    --lr "$LR" --warmup 2 --no-checkpointing --device "$DEVICE"
echo "== after training"
$R rec eval --data "$OUT/valid.json" --limit "$EVAL" --adapter "$OUT/adapter" --device "$DEVICE" \
    --json "$OUT/after.json"

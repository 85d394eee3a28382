#!/usr/bin/env bash
# Low-bit fidelity of the real ViT-S/14 (CIFAR-10 head) in ../shared (docs/lowbit.md §5, §6, §8): base, ptq4vit,
# rotq and repq-vit at W8A8, W6A6, W4A4, then rotq and repq-vit with one component switched off per run
# (ptq4vit.harness.ablations.ROTQ_ABLATION_ROWS, REPQ_ABLATION_ROWS) and ptq4vit with each post-GELU quantizer of fc2's
# input (POST_GELU_ROWS: uniform, log2, log-sqrt2; the twin is ptq4vit itself) at W6A6 and W4A4. 32 calibration images of cifar10/calib (seed 3),
# the first 100 test images per class; every row has top-1, agreement with the float model, mean
# KL(float||quant) and calibration seconds. Resumable: re-running skips finished runs.
# Usage: bash benchmarks/lowbit_accuracy.sh [--main-only | --reconstruction] [extra sweep options, e.g. --limit 1000 for all 10 000 images]
# --main-only: the four presets at three bit settings (12 runs), without the ablation rows.
# --reconstruction: rotq with and without reconstruction (docs/lowbit.md §11; the pool: the first
#   reconstruction.images of the calibration draw, 512 by default) at W4A4, W6A6, W3A3 and W4A8, then
#   at W4A4 one reconstruction switch changed per row (ptq4vit.harness.ablations.RECONSTRUCTION_ABLATION_ROWS).
set -euo pipefail
MAIN_ONLY=0
RECONSTRUCTION=0
if [ "${1:-}" = "--main-only" ]; then MAIN_ONLY=1; shift; fi
if [ "${1:-}" = "--reconstruction" ]; then RECONSTRUCTION=1; shift; fi
cd "$(dirname "$0")/.."
SHARED=${PTQ4VIT_SHARED:-../shared}
OUT=${OUT:-runs/lowbit_vit_s14}
sweep() {
    .venv/bin/ptq4vit sweep --models vit_s14_cifar10 --weights "$SHARED/models" \
        --data "$SHARED/data/cifar10" --val-split test --calib-dir "$SHARED/data/cifar10/calib" \
        --limit 100 --out "$OUT" "$@"
}
if [ "$RECONSTRUCTION" = 1 ]; then
    for bits in W4A4 W6A6 W3A3 W4A8; do
        sweep --preset rotq --bits "$bits" "$@"
        sweep --preset rotq --bits "$bits" --set reconstruction=learned "$@"
    done
    .venv/bin/python -c 'from ptq4vit.harness.ablations import RECONSTRUCTION_ABLATION_ROWS
for ov in RECONSTRUCTION_ABLATION_ROWS.values(): print(" ".join(f"--set {k}={v}" for k, v in ov.items()))' |
    while read -r sets; do
        # shellcheck disable=SC2086
        sweep --preset rotq --bits W4A4 --set reconstruction=learned $sets "$@" </dev/null
    done
    .venv/bin/ptq4vit report "$OUT/results.jsonl" --out "$OUT/report"
    exit 0
fi
sweep --preset base,ptq4vit,rotq,repq-vit --bits W8A8,W6A6,W4A4 "$@"
if [ "$MAIN_ONLY" = 1 ]; then
    .venv/bin/ptq4vit report "$OUT/results.jsonl" --out "$OUT/report"
    exit 0
fi
.venv/bin/python -c 'from ptq4vit.harness.ablations import POST_GELU_ROWS, REPQ_ABLATION_ROWS, ROTQ_ABLATION_ROWS
for preset, rows in (("rotq", ROTQ_ABLATION_ROWS), ("repq-vit", REPQ_ABLATION_ROWS), ("ptq4vit", POST_GELU_ROWS)):
    for ov in rows.values(): print(preset, " ".join(f"--set {k}={v}" for k, v in ov.items()))' |
while read -r preset sets; do
    # shellcheck disable=SC2086
    sweep --preset "$preset" --bits W6A6,W4A4 $sets "$@" </dev/null
done
.venv/bin/ptq4vit report "$OUT/results.jsonl" --out "$OUT/report"

#!/usr/bin/env bash
# Float vs base vs ptq4vit top-1 of the real pretrained ViT-S/14 (CIFAR-10 head) in ../shared at
# W8A8, W6A6 and W4A4: 32 calibration images from cifar10/calib (seed 3), evaluation on the
# first 100 test images of each class (1000 images). Resumable: re-running skips finished runs.
# Usage: bash benchmarks/cifar_accuracy.sh [extra sweep options, e.g. --bits W6A6]
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${PTQ4VIT_SHARED:-../shared}
OUT=${OUT:-runs/cifar_vit_s14}
.venv/bin/ptq4vit sweep --models vit_s14_cifar10 --weights "$SHARED/models" \
    --data "$SHARED/data/cifar10" --val-split test --calib-dir "$SHARED/data/cifar10/calib" \
    --limit 100 --preset base,ptq4vit --bits W8A8,W6A6,W4A4 --out "$OUT" "$@"
.venv/bin/ptq4vit report "$OUT/results.jsonl" --out "$OUT/report"

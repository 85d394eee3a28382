#!/usr/bin/env bash
# Set up (if needed) and run the main job on the data shipped in ../shared: quantize the real
# pretrained ViT-S/14 (CIFAR-10 head) with BasePTQ and PTQ4ViT at W8A8, calibrating on 32
# CIFAR-10 training images and evaluating on the first 100 test images of each class.
# Extra arguments go to `ptq4vit quantize` (e.g. --bits W6A6, --limit 1000 for the whole test set).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${PTQ4VIT_SHARED:-../shared}
bash scripts/setup.sh
exec .venv/bin/ptq4vit quantize --model vit_s14_cifar10 --weights "$SHARED/models" \
    --data "$SHARED/data/cifar10" --val-split test --calib-dir "$SHARED/data/cifar10/calib" \
    --limit 100 --bits W8A8 --preset base,ptq4vit --out runs/demo "$@"

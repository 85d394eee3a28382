"""Calibration wall time of vit_tiny_patch16_224 (random init, 32 images at 224), per preset.

Usage: python benchmarks/calibration_speed.py [--presets base official ptq4vit] [--images 32]
                                              [--released-seconds S]
``--released-seconds``: the released PTQ4ViT code's wall time for the ptq4vit W8A8 case, timed by
you on the same machine (it needs about an hour on a 2-core CPU); the ptq4vit row then shows the
ratio of that time to ours.
"""
from __future__ import annotations

import argparse
import time

import timm
import torch

import ptq4vit

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--presets", nargs="+", default=["base", "official", "ptq4vit"])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--bits", type=int, nargs=2, default=(8, 8), metavar=("W", "A"))
    parser.add_argument("--memory-budget-mib", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--progress", action="store_true", help="show the per-layer progress bar")
    parser.add_argument("--released-seconds", type=float, default=None,
                        help="the released code's measured wall seconds for ptq4vit at these settings")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    images = torch.randn(args.images, 3, 224, 224)
    budget = args.memory_budget_mib << 20 if args.memory_budget_mib else None
    print(f"{args.model} random init, {args.images} images, W{args.bits[0]}A{args.bits[1]}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| preset | calibration wall s | process CPU s | released-code s / ours (wall) |")
    print("|---|---|---|---|")
    for preset in args.presets:
        start, cpu_start = time.perf_counter(), time.process_time()
        ptq4vit.quantize(model, images, preset, *args.bits, memory_budget=budget, progress=args.progress)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        ratio = f"{args.released_seconds / seconds:.1f}x" if preset == "ptq4vit" and args.released_seconds else "-"
        print(f"| {preset} | {seconds:.1f} | {cpu:.1f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()

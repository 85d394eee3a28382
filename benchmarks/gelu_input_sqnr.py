"""How each post-GELU quantizer represents fc2's input of the real ViT-S/14, on the input alone.

Usage: python benchmarks/gelu_input_sqnr.py [--images 4] [--bits 4 6] [--candidates 25]

Runs the float model on the first ``--images`` of the 32 calibration images (cifar10/calib, seed 3),
records every block's fc2 input (the GELU output), prints what those values look like (share
negative, quantiles of the positive ones relative to the largest) and, per bit width, the
signal-to-quantization-noise ratio ``10 log10(Σx² / Σ(x - q(x))²)`` of each quantizer with its
scale chosen by the smallest squared error over the ``ptq4vit`` preset's grid range (docs/method.md §2,
``--candidates`` points):
uniform (symmetric), the post-GELU twin (free Δ+), the post-GELU log quantizer with base 2 and √2
(docs/lowbit.md §8). This scores the operand, not fc2's output, so it only indicates which grid
fits the values; the accuracy comparison is benchmarks/lowbit_accuracy.py.
"""
from __future__ import annotations

import argparse
import math

import torch

from ptq4vit.harness import zoo
from ptq4vit.harness.data import ImageFolder, calibration_images
from ptq4vit.presets import get_preset
from ptq4vit.quant import (candidate_factors, gelu_log_fake_quant, gelu_twin_fake_quant, gelu_twin_neg_step,
                           initial_scale, uniform_fake_quant)


def best_sqnr(x: torch.Tensor, quant, start: torch.Tensor, factors: torch.Tensor) -> float:
    """SQNR (dB) of ``quant(x, Δ0·f)`` for the grid factor with the smallest squared error."""
    err = min(float((quant(x, (start * f).reshape(1)) - x).double().pow(2).sum()) for f in factors)
    return 10 * math.log10(float(x.double().pow(2).sum()) / err)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--candidates", type=int, default=25, help="grid points from alpha to beta (the preset has 100)")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 6])
    args = ap.parse_args()
    shared = zoo.shared_dir()
    lm = zoo.create("vit_s14_cifar10", weights=shared / "models")
    calib = calibration_images(ImageFolder(shared / "data" / "cifar10" / "calib", lm.transform()), 32, seed=3).images
    inputs = []
    hooks = [blk.mlp.fc2.register_forward_hook(lambda m, inp, out: inputs.append(inp[0].flatten()))
             for blk in lm.model.blocks]
    lm.model(calib[:args.images])
    for h in hooks:
        h.remove()
    preset = get_preset("ptq4vit")
    factors = candidate_factors(preset.alpha, preset.beta, args.candidates)

    print("| block | negative (%) | min | max | positive median / max | positive 99th pct / max |")
    print("|---:|---:|---:|---:|---:|---:|")
    for i, x in enumerate(inputs):
        pos = x[x > 0]
        q = torch.quantile(pos[torch.linspace(0, pos.numel() - 1, min(pos.numel(), 1 << 20)).long()],
                           torch.tensor([0.5, 0.99]))
        print(f"| {i} | {100 * float((x < 0).double().mean()):.1f} | {float(x.min()):.3f} | {float(x.max()):.1f} | "
              f"{float(q[0] / x.max()):.2e} | {float(q[1] / x.max()):.2e} |")

    for bits in args.bits:
        neg = torch.tensor(gelu_twin_neg_step(bits))
        kinds = {
            "uniform": (lambda x, s: uniform_fake_quant(x, s, bits), lambda x: initial_scale(x.abs().max(), bits)),
            "twin": (lambda x, s: gelu_twin_fake_quant(x, s, neg, bits), lambda x: initial_scale(x.max(), bits)),
            "log2": (lambda x, s: gelu_log_fake_quant(x, s, neg, bits, "log2"), lambda x: x.max()),
            "log-sqrt2": (lambda x, s: gelu_log_fake_quant(x, s, neg, bits, "log_sqrt2"), lambda x: x.max()),
        }
        print(f"\n{bits} bits: SQNR (dB) of fc2's input, scale with the smallest squared error on the grid")
        print("| block | " + " | ".join(kinds) + " |")
        print("|---:|" + "---:|" * len(kinds))
        totals = dict.fromkeys(kinds, 0.0)
        for i, x in enumerate(inputs):
            row = {k: best_sqnr(x, fn, start(x), factors) for k, (fn, start) in kinds.items()}
            for k, v in row.items():
                totals[k] += v / len(inputs)
            print(f"| {i} | " + " | ".join(f"{v:.1f}" for v in row.values()) + " |", flush=True)
        print("| mean | " + " | ".join(f"{v:.1f}" for v in totals.values()) + " |")


if __name__ == "__main__":
    main()

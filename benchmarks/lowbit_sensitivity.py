"""Which activation quantizers cost a calibrated model its fidelity: one kind switched on at a time.

Usage: python benchmarks/lowbit_sensitivity.py [--preset rotq] [--bits W6A6] [--set FIELD=VALUE ...] [--limit 40]

Calibrates the real ViT-S/14 CIFAR-10 model (32 cifar10/calib images, seed 3), then evaluates it on
the first ``--limit`` test images per class with every activation quantizer off ("weights only"),
all on, and each kind alone (the same operand of every block, e.g. ``mlp.fc2.a`` = fc2's input,
``attn.matmul2.a`` = the post-softmax operand), printing top-1 agreement with the float model and
mean KL(float ‖ quantized). Weights stay quantized throughout (GPTQ writes its rounded values into
the layers). A kind whose row is far below "weights only" is where the bits are lost.

With ``--set reconstruction=learned`` the model is reconstructed after calibration (docs/lowbit.md §11)
on the pool ``benchmarks/lowbit_accuracy.py`` uses (the calibration draw continued to
``reconstruction.images``), so the rows say what reconstruction leaves.
"""
from __future__ import annotations

import argparse
import time

import torch

import ptq4vit
from ptq4vit.harness import zoo
from ptq4vit.harness.data import ImageFolder, calibration_and_pool, make_loader
from ptq4vit.harness.fidelity import mean_kl, top1_agreement
from ptq4vit.harness.runner import parse_bits
from ptq4vit.presets import parse_field


@torch.no_grad()
def logits_of(model, dataset) -> torch.Tensor:
    return torch.cat([model(b.images) for b in make_loader(dataset, batch_size=50, num_workers=0)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="rotq")
    ap.add_argument("--bits", default="W6A6")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--limit", type=int, default=40, help="test images per class")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: parse_field(k, v) for k, v in (kv.split("=", 1) for kv in args.set)}
    w_bits, a_bits = parse_bits(args.bits)

    shared = zoo.shared_dir()
    lm = zoo.create("vit_s14_cifar10", weights=shared / "models")
    tf = lm.transform()
    test = ImageFolder(shared / "data" / "cifar10" / "test", tf, limit_per_class=args.limit, strict=True)
    ref = logits_of(lm.model, test)
    recipe = ptq4vit.get_recipe(args.preset, **overrides)
    calib, pool = calibration_and_pool(ImageFolder(shared / "data" / "cifar10" / "calib", tf), recipe, 32, seed=3)
    start = time.perf_counter()
    q = ptq4vit.quantize(lm.model, calib, recipe, w_bits, a_bits, progress=False, reconstruction_images=pool)
    print(f"{args.preset} {args.bits} {overrides or ''}: calibrated in {time.perf_counter() - start:.0f} s; "
          f"{len(ref)} test images", flush=True)

    kinds: dict[str, list] = {}
    for name, site in q.sites().items():
        for attr in ("a_quant", "b_quant"):
            quant = getattr(site, attr, None)
            if quant is not None:
                kind = name.split(".", 2)[2] if name.startswith("blocks.") else name
                kinds.setdefault(f"{kind}.{attr[0]}", []).append(quant)

    print("| activations quantized | agreement (%) | KL(float‖quant) |")
    print("|---|---:|---:|")

    def row(label: str, on: set) -> None:
        for kind, quants in kinds.items():
            for quant in quants:
                quant.enabled = kind in on
        out = logits_of(q, test)
        print(f"| {label} | {top1_agreement(ref, out):.1f} | {mean_kl(ref, out):.4f} |", flush=True)

    row("none (weights only)", set())
    row("all", set(kinds))
    for kind in kinds:
        row(f"only {kind}", {kind})


if __name__ == "__main__":
    main()

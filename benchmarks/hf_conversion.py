"""The real ViT-S/14 (timm, ../shared/models) against the same weights converted to Hugging Face
``Dinov2ForImageClassification`` (``ptq4vit/harness/hf_convert.py``): largest |logit difference| and
top-1 agreement on the first ``--images-per-class`` CIFAR-10 test images of each class.

With ``--quantize PRESET`` both models are also quantized (``--bits``, default W6A6) on the same 32
calibration images (cifar10/calib, the harness's draw with seed 3, as the sweep does), and the script
prints each quantized model's top-1 and top-1 agreement with its own float model, and the agreement of
the two quantized models with each other. Both models see the timm model's preprocessing.

    python benchmarks/hf_conversion.py [--images-per-class 10] [--quantize rotq --bits W6A6]
"""
from __future__ import annotations

import argparse

import torch

import ptq4vit
from ptq4vit.export.cpu import cpu_name
from ptq4vit.harness import zoo
from ptq4vit.harness.data import ImageFolder, calibration_images, make_loader
from ptq4vit.harness.fidelity import top1_agreement
from ptq4vit.harness.runner import parse_bits


@torch.no_grad()
def logits_of(models, dataset, batch_size: int = 50) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each model's logits on ``dataset``, and the labels."""
    outs: list[list[torch.Tensor]] = [[] for _ in models]
    labels = []
    for batch in make_loader(dataset, batch_size=batch_size, num_workers=0):
        for out, model in zip(outs, models):
            out.append(model(batch.images))
        labels.append(batch.labels)
    return [torch.cat(o) for o in outs], torch.cat(labels)


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(-1) == labels).double().mean())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images-per-class", type=int, default=10, help="first N test images of each class (default: 10)")
    p.add_argument("--quantize", metavar="PRESET", help="also quantize both models with this preset (e.g. rotq)")
    p.add_argument("--bits", default="W6A6", help="bits of --quantize (default: W6A6)")
    args = p.parse_args()
    bits = parse_bits(args.bits) if args.quantize else None
    shared = zoo.shared_dir()
    cifar = shared / "data" / "cifar10"
    timm_lm = zoo.create("vit_s14_cifar10", weights=shared / "models")
    hf_lm = zoo.create("vit_s14_cifar10_hf", weights=shared / "models")
    tf = timm_lm.transform()
    test = ImageFolder(cifar / "test", tf, limit_per_class=args.images_per_class, strict=True)
    (a, b), labels = logits_of((timm_lm.model, hf_lm.model), test)
    n = len(labels)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; {n} CIFAR-10 test images")
    print(f"timm ViT-S/14 vs Hugging Face Dinov2ForImageClassification (converted): max |logit difference| "
          f"{float((a - b).abs().max()):.3g} (largest |logit| {float(a.abs().max()):.3g}), top-1 agreement "
          f"{top1_agreement(a, b):.1f}%")
    if not args.quantize:
        return 0
    calib = calibration_images(ImageFolder(cifar / "calib", tf), 32, seed=3).images
    qa, qb = (ptq4vit.quantize(m, calib, args.quantize, *bits, progress=False) for m in (timm_lm.model, hf_lm.model))
    (ya, yb), _ = logits_of((qa, qb), test)
    what = f"{args.quantize} {args.bits}, 32 calibration images (seed 3)"
    for name, ref, y in (("timm ViT-S/14", a, ya), ("Hugging Face Dinov2", b, yb)):
        print(f"{name} {what}: top-1 {top1(y, labels):.1f}% (float {top1(ref, labels):.1f}%), top-1 agreement with "
              f"its float model {top1_agreement(ref, y):.1f}%")
    print(f"timm vs Hugging Face, both {args.quantize} {args.bits}: top-1 agreement {top1_agreement(ya, yb):.1f}%, "
          f"max |logit difference| {float((ya - yb).abs().max()):.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The real ViT-S/14 (timm, ../shared/models) against the same weights converted to Hugging Face
``Dinov2ForImageClassification`` (``ptq4vit/harness/hf_convert.py``): largest |logit difference| and
top-1 agreement on CIFAR-10 test images, every ``--every``-th file of each class.

    python benchmarks/hf_conversion.py [--images-per-class 10]
"""
from __future__ import annotations

import argparse

import torch
from PIL import Image

from ptq4vit.export.cpu import cpu_name
from ptq4vit.harness import zoo


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images-per-class", type=int, default=10, help="first N test images of each class (default: 10)")
    args = p.parse_args()
    shared = zoo.shared_dir()
    timm_lm = zoo.create("vit_s14_cifar10", weights=shared / "models")
    hf_lm = zoo.create("vit_s14_cifar10_hf", weights=shared / "models")
    tf = timm_lm.transform()
    files = [f for d in sorted((shared / "data" / "cifar10" / "test").iterdir())
             for f in sorted(d.glob("*.jpg"))[:args.images_per_class]]
    diff, agree, peak = 0.0, 0, 0.0
    with torch.no_grad():
        for i in range(0, len(files), 50):
            x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files[i:i + 50]])
            a, b = timm_lm.model(x), hf_lm.model(x)
            diff = max(diff, float((a - b).abs().max()))
            peak = max(peak, float(a.abs().max()))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; {len(files)} CIFAR-10 test images")
    print(f"timm ViT-S/14 vs Hugging Face Dinov2ForImageClassification (converted): max |logit difference| "
          f"{diff:.3g} (largest |logit| {peak:.3g}), top-1 agreement {100.0 * agree / len(files):.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

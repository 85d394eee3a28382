"""Half-precision calibration vs float32 on tiny random-init ViTs (docs/models.md, "Dtypes").

Usage: python benchmarks/half_precision.py [--seeds 0 3 4]

For each seed, quantizes the same float32 ViT (embed 32, depth 2, 4 random calibration images,
ptq4vit preset W8A8 with 16 candidates and 2 rounds) as float32, bfloat16 and float16, and prints the
relative logit error (‖out - ref‖ / ‖ref‖ over 8 random test images) of each quantized model
against the float32 float model, and of the half models against the float32 quantized one.
"""
import argparse
import copy

import torch
from timm.models.vision_transformer import VisionTransformer

import ptq4vit

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
FAST = dict(n_candidates=16, rounds=2, progress=False)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 3, 4])
    args = p.parse_args()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    test = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    print("seed  dtype     quantized vs float32 model   vs float32 quantized model")
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = VisionTransformer(**VIT).eval()
        with torch.no_grad():
            ref = model(test)
        q32 = None
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            q = ptq4vit.quantize(copy.deepcopy(model).to(dtype), images, "ptq4vit", 8, 8, **FAST)
            with torch.no_grad():
                out = q(test.to(dtype))
            if dtype == torch.float32:
                q32 = out
            vs_q32 = "" if dtype == torch.float32 else f"{rel(out, q32):.4f}"
            print(f"{seed:<5} {str(dtype).split('.')[1]:<9} {rel(out, ref):<28.4f} {vs_q32}", flush=True)


if __name__ == "__main__":
    main()

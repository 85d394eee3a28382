"""Time block reconstruction (docs/lowbit.md §11) on this CPU: one full-size ViT-S/14 block, random init,
``rotq`` W4A4, a 16-image pool; prints seconds per optimization step (8 images) and per pool image
and block, on 1 and on 2 intra-op threads."""
import time

import timm
import torch

import ptq4vit
from ptq4vit import Reconstruction
torch.manual_seed(0)
m = timm.create_model("vit_small_patch14_dinov2", img_size=224, num_classes=10, pretrained=False, depth=1).eval()
x = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def seconds(threads: int, iterations: int = 0) -> float:
    """Wall time of calibrating the block on 8 images, then reconstructing it (``iterations`` > 0) on all 16."""
    options = dict(reconstruction=Reconstruction(iterations=iterations, images=16, batch_size=8),
                   reconstruction_images=x) if iterations else {}
    t = time.time()
    ptq4vit.quantize(m, x[:8], "rotq", 4, 4, progress=False, n_candidates=10, rounds=1, threads=threads, **options)
    return time.time() - t


for threads in (1, 2):
    res = {iters: seconds(threads, iters) for iters in (0, 5, 25)}
    per_it = (res[25] - res[5]) / 20
    fixed = res[5] - res[0] - 5 * per_it
    print(f"threads={threads}: calibration {res[0]:.1f} s; reconstruction {per_it:.3f} s/iteration (batch 8), "
          f"{fixed:.2f} s of passes per block for a 16-image pool (totals {res})", flush=True)

"""Time block reconstruction (docs/lowbit.md §11) on this CPU: one full-size ViT-S/14 block, random init,
``rotq`` W4A4, a 16-image pool; prints seconds per optimization step (8 images) and per pool image
and block, on 1 and on 2 intra-op threads."""
import copy
import time

import timm
import torch

import ptq4vit
from ptq4vit import Reconstruction, reconstruct
torch.manual_seed(0)
m = timm.create_model("vit_small_patch14_dinov2", img_size=224, num_classes=10, pretrained=False, depth=1).eval()
x = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(1))
t = time.time()
q = ptq4vit.quantize(m, x[:8], "rotq", 4, 4, progress=False, n_candidates=10, rounds=1, threads=1)
print(f"calibration of 1 block on 8 images: {time.time()-t:.1f}s", flush=True)
for threads in (1, 2):
    res = {}
    for iters in (5, 25):
        q2 = copy.deepcopy(q)
        t = time.time()
        rep = reconstruct(q2, x, Reconstruction(iterations=iters, images=16, batch_size=8), progress=False, threads=threads)
        res[iters] = time.time() - t
    per_it = (res[25] - res[5]) / 20
    fixed = res[5] - 5 * per_it
    print(f"threads={threads}: {per_it:.3f} s/iteration (batch 8), {fixed:.2f} s of passes per block for a 16-image pool"
          f" (totals {res})", flush=True)

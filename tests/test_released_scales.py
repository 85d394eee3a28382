"""``official`` with the cosine metric (the paper's cosine ablation row) chooses the released
PTQ4ViT code's scales: all 27 searched tensors of the tiny reference run.

``tests/data/released_cosine_scales.json`` holds the scales the released code chose on this
run (written by ``python benchmarks/ptq4vit_released.py --released <PTQ4ViT checkout> --write
tests/data/released_cosine_scales.json``: the pinned-scale test's tiny ViT, its six images,
W6A6, 100 candidates, 3 rounds). Several candidates are near-ties that only the released code's
float32 reduction order decides (docs/method.md §2); scales are compared to 1e-6 relative, far
below one grid step (~1%).
"""
import json
import math
from pathlib import Path

import timm
import torch

import ptq4vit

RELEASED = json.loads((Path(__file__).parent / "data" / "released_cosine_scales.json").read_text())


def test_official_cosine_chooses_the_released_codes_scales_on_every_tensor():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=48, num_heads=3, num_classes=10).eval()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    q = ptq4vit.quantize(model, images, "official", RELEASED["w_bits"], RELEASED["a_bits"], progress=False,
                         metric="cosine", n_candidates=RELEASED["n_candidates"])
    got = q.qparams()["modules"]
    differ, tensors = [], 0
    for name, fields in RELEASED["modules"].items():
        for field, want in fields.items():
            tensors += 1
            have = got[name][field]
            want, have = (want, have) if isinstance(want, list) else ([want], [have])
            if len(have) != len(want) or not all(math.isclose(h, w, rel_tol=1e-6, abs_tol=0.0)
                                                 for h, w in zip(have, want)):
                differ.append(f"{name}.{field}")
    assert tensors == 27
    assert differ == []

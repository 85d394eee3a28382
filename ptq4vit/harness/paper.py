"""The paper's reported ImageNet top-1 numbers (docs/method.md §7), for side-by-side tables."""
from __future__ import annotations

from typing import Optional

#: ImageNet top-1 (%) from the paper's README: model -> (FP, base W8A8, base W6A6, PTQ4ViT W8A8, PTQ4ViT W6A6).
PAPER_ROWS = {
    "ViT-S/224/32": (75.99, 73.61, 60.144, 75.582, 71.908),
    "ViT-S/224": (81.39, 80.468, 70.244, 81.002, 78.63),
    "ViT-B/224": (84.54, 83.896, 75.668, 84.25, 81.65),
    "ViT-B/384": (86.00, 85.352, 46.886, 85.828, 83.348),
    "DeiT-S/224": (79.80, 77.654, 72.268, 79.474, 76.282),
    "DeiT-B/224": (81.80, 80.946, 78.786, 81.482, 80.25),
    "DeiT-B/384": (83.11, 82.33, 68.442, 82.974, 81.55),
    "Swin-T/224": (81.39, 80.962, 78.456, 81.246, 80.47),
    "Swin-S/224": (83.23, 82.758, 81.742, 83.106, 82.38),
    "Swin-B/224": (85.27, 84.792, 83.354, 85.146, 84.012),
    "Swin-B/384": (86.44, 86.168, 85.226, 86.394, 85.388),
}
#: Which paper column a preset is compared with.
PAPER_METHOD = {"base": "base", "base-cosine": "base", "official": "PTQ4ViT", "ptq4vit": "PTQ4ViT"}
PRESET_ORDER = ("base", "base-cosine", "official", "ptq4vit")


def paper_top1(model: str, method: Optional[str] = None, bits: Optional[str] = None) -> Optional[float]:
    """The paper's number: ``method=None`` gives the float top-1, else ``"base"``/``"PTQ4ViT"`` at ``"W8A8"``/``"W6A6"``."""
    row = PAPER_ROWS.get(model)
    if row is None:
        return None
    if method is None:
        return row[0]
    col = {("base", "W8A8"): 1, ("base", "W6A6"): 2, ("PTQ4ViT", "W8A8"): 3, ("PTQ4ViT", "W6A6"): 4}.get((method, bits))
    return None if col is None else row[col]



"""The residual rotation's checks shared by timm's BEiT and EVA layouts: one final LayerNorm and a Linear
head to fold the last rotation into, and LayerNorms before every branch (docs/lowbit.md §2)."""
from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError


def check_final_norm_and_head(model: nn.Module) -> None:
    """Refuse by name a final norm or a head the last rotation cannot be folded into."""
    norms = [m for m in (model.norm, model.fc_norm) if not isinstance(m, nn.Identity)]
    if len(norms) != 1 or not isinstance(norms[0], nn.LayerNorm):
        raise UnsupportedModelError("residual rotation needs exactly one final LayerNorm (norm or fc_norm)")
    if type(model.head) is not nn.Linear:
        raise UnsupportedModelError(
            f"module 'head': residual rotation needs a Linear classifier to fold the last rotation into, not "
            f"{type(model.head).__name__} (num_classes=0 would return rotated features)")


def check_block_norms(model: nn.Module) -> None:
    """Refuse by name a block whose ``norm1`` or ``norm2`` is not a LayerNorm (a rotation folds only into those)."""
    for i, blk in enumerate(model.blocks):
        for norm in ("norm1", "norm2"):
            if not isinstance(getattr(blk, norm), nn.LayerNorm):
                raise UnsupportedModelError(f"module 'blocks.{i}.{norm}': residual rotation needs a LayerNorm")

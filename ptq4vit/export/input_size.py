"""The image size an export traces at: the model's own, or another one the model accepts.

A timm model built for one size refuses other sizes inside its forward (an ``AssertionError``
deep in the patch embedding). A model built with ``dynamic_img_size=True`` accepts any size, but
its ViT forward resamples the position embedding for the input's grid with an antialiased
bicubic interpolation, an operator the ONNX exporter has no form for. The export is of one fixed
size anyway, so :func:`fixed_position_embedding` resamples the embedding once, eagerly, and the
trace takes it as a constant.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from ..errors import UserError

__all__ = ["model_input_size", "resolve_input_size", "fixed_position_embedding", "size_text"]


def size_text(size: tuple) -> str:
    """``(3, 224, 224)`` as ``3x224x224``."""
    return "x".join(str(int(v)) for v in size)


def model_input_size(model: nn.Module) -> Optional[tuple[int, int, int]]:
    """``(C, H, W)`` the model was built for (its patch embedding's), or None when it does not say."""
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None)
    proj = getattr(pe, "proj", None)
    if img is None or not hasattr(proj, "in_channels"):
        return None
    return (int(proj.in_channels), int(img[0]), int(img[1]))


def _accepts_other_sizes(model: nn.Module) -> bool:
    return bool(getattr(model, "dynamic_img_size", False))


def resolve_input_size(model: nn.Module, input_size: Optional[tuple]) -> tuple:
    """The input size (without batch) to export at: ``(C, H, W)`` for an image model; a UserError naming both sizes if the model cannot take it."""
    own = model_input_size(model)
    if input_size is None:
        if own is None:
            raise UserError("cannot tell the model's input size; pass input_size=(3, H, W)")
        return own
    try:
        size = tuple(int(v) for v in input_size)
        ok = len(size) >= 1 and all(v >= 1 for v in size) and all(int(v) == v for v in input_size)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"input_size must be a tuple of positive integers, (C, H, W) for an image model, "
                        f"got {input_size!r}")
    if own is None or size == own:
        return size
    if len(size) != 3:
        raise UserError(f"input_size must be (C, H, W) for this image model ({size_text(own)}), got {input_size!r}")
    if size[0] != own[0]:
        raise UserError(f"input_size {size_text(size)} has {size[0]} channels; the model takes {own[0]} "
                        f"({size_text(own)})")
    if not _accepts_other_sizes(model):
        raise UserError(f"the model takes {size_text(own)} images and cannot be exported at {size_text(size)} "
                        f"(a timm model built with dynamic_img_size=True can)")
    return size


@contextlib.contextmanager
def fixed_position_embedding(model: nn.Module, size: tuple) -> Iterator[None]:
    """While tracing a ``dynamic_img_size`` ViT at ``size``: its position embedding already resampled to
    that size's grid, so that the forward's own resampling is a no-op (timm skips it when the grids match).
    Anything else is left as it is. The model is restored afterwards."""
    pe = getattr(model, "patch_embed", None)
    pos = getattr(model, "pos_embed", None)
    if not _accepts_other_sizes(model) or not isinstance(pos, torch.Tensor) or not hasattr(pe, "dynamic_feat_size"):
        yield
        return
    old_grid = tuple(pe.grid_size)
    grid = tuple(pe.dynamic_feat_size(tuple(size[1:])))
    if grid == old_grid:
        yield
        return
    from timm.layers import resample_abs_pos_embed
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 0))
    with torch.no_grad():
        resampled = resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(old_grid), num_prefix_tokens=prefix)
    model.pos_embed = nn.Parameter(resampled, requires_grad=False)
    pe.grid_size = grid
    try:
        yield
    finally:
        model.pos_embed = pos
        pe.grid_size = old_grid

"""RepQ-ViT's scale reparameterization of a LayerNorm and the linear layer it feeds (docs/lowbit.md §6).

The input of the linear layer has one range per channel (step ``Δ_c``, zero point ``z_c``). With
``Δ = mean(Δ_c)``, ``z`` the mean zero point, ``r_c = Δ_c / Δ`` and ``b_c = min_c / r_c - min``
(``min_c = -z_c Δ_c``, ``min = -z Δ``), the norm's output ``y`` becomes ``y / r - b``, whose every
channel has the range ``[min, min + (2^bits - 1) Δ]`` of one per-tensor quantizer, and the layer
computes ``(W diag(r)) (y / r - b) + (bias + W diag(r) b) = W y + bias``: the float function is unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..quant import qmax


def zero_bias(linear: nn.Module) -> None:
    """Give a bias-free linear layer a zero bias, for the fold to write into (same function)."""
    if linear.bias is None:
        w = linear.weight
        linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))


@torch.no_grad()
def fold_channel_ranges(norm: nn.LayerNorm, linear: nn.Module, scale: torch.Tensor, zero_point: torch.Tensor,
                        bits: int, round_zero_point: bool = False,
                        dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold the per-channel ranges ``(Δ_c, z_c)`` (signed zero points) of ``linear``'s input into ``norm``'s
    affine and ``linear``'s weight and bias, in place; return the per-tensor ``(Δ, z)`` that replaces them.

    The target zero point is the channels' mean, unrounded as in the released code (the quantizer
    then clamps at ``-z`` and ``2^bits - 1 - z`` steps, off the grid), or with ``round_zero_point`` rounded
    to the integer that integer kernels need; ``b`` is computed from the zero point used, so the fold
    is exact either way. Computed in ``dtype``, by default the parameters' (at least float32), op for
    op as the released code computes it (so its rounding is the released code's); float64 rounds
    only when written back in the parameters' dtype.
    """
    if dtype is None:
        dtype = torch.promote_types(linear.weight.dtype, torch.float32)
    step = scale.to(dtype)
    zp_u = zero_point.to(dtype) + qmax(bits)          # RepQ-ViT's unsigned zero points
    target_step = step.mean()
    target_zp_u = zp_u.mean().round() if round_zero_point else zp_u.mean()
    r = step / target_step
    b = (-zp_u * step) / r + target_zp_u * target_step
    gamma, beta = norm.weight, norm.bias
    w = linear.weight.to(dtype) * r
    new_bias = linear.bias.to(dtype) + torch.mm(w, b.reshape(-1, 1)).reshape(-1)
    gamma.copy_((gamma.to(dtype) / r).to(gamma.dtype))
    beta.copy_((beta.to(dtype) / r - b).to(beta.dtype))
    linear.weight.copy_(w.to(linear.weight.dtype))
    linear.bias.copy_(new_bias.to(linear.bias.dtype))
    return target_step.float(), (target_zp_u.float() - qmax(bits))

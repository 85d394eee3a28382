"""Asymmetric (zero-point) uniform quantization, the arithmetic of RepQ-ViT's quantizers (docs/lowbit.md §6).

A b-bit asymmetric quantizer with step ``Δ`` and zero point ``z`` maps ``x`` to
``(clamp(round(x / Δ) + z, -qmax, qmax - 1) - z) · Δ``. Codes are signed (``[-qmax, qmax - 1]``, so
they fit int8 like the symmetric ones); the range ``[min, max]`` of the data sits on them through
``z``. RepQ-ViT writes the same quantizer with unsigned codes ``[0, 2^b - 1]`` and zero point
``z + qmax``: the integers differ by ``qmax``, the values are identical.

Pure tensor functions; scales and zero points are float32 (an integer, except the unrounded one
RepQ-ViT's fold leaves on an activation, docs/lowbit.md §6) and
broadcast against the operand like the symmetric ones (:mod:`.uniform`).
"""
from __future__ import annotations

import torch

from .uniform import MIN_SCALE, compute_dtype, qmax


def asymmetric_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``clamp(round(x / Δ) + z, -qmax, qmax - 1)`` as float32 (float64 for a float64 x)."""
    q = qmax(bits)
    return torch.round(x.to(compute_dtype(x)) / scale).add_(zero_point).clamp_(-q, q - 1)


def asymmetric_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """``(clamp(round(x / Δ) + z_u, 0, 2^b - 1) - z_u) · Δ`` with ``z_u = z + qmax``, in float32 (float64
    for a float64 x), rounded once to x's dtype.

    Computed with RepQ-ViT's unsigned zero point: for an integer ``z`` every step is exact and the
    values are those of :func:`asymmetric_codes` then :func:`asymmetric_dequantize`; for the
    fractional one its fold leaves (docs/lowbit.md §6) the sums round as the released code's do.
    """
    q = qmax(bits)
    unsigned_zero = zero_point + q
    u = torch.round(x.to(compute_dtype(x)) / scale).add_(unsigned_zero).clamp_(0, 2 * q - 1)
    return u.sub_(unsigned_zero).mul_(scale).to(x.dtype)


def asymmetric_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                          dtype: torch.dtype) -> torch.Tensor:
    """``(codes - z) · Δ`` in float32, rounded once to ``dtype``; overwrites ``codes`` when it is float."""
    c = codes if codes.is_floating_point() else codes.to(torch.float32)
    return c.sub_(zero_point).mul_(scale).to(dtype)


def range_to_step(low: torch.Tensor, high: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Δ, z)`` that put ``[low, high]`` on the ``2^b`` codes: ``Δ = (high - low) / (2^b - 1)``,
    ``z = round(-low / Δ) - qmax`` (RepQ-ViT's unsigned zero point, shifted to signed codes).

    Δ is at least MIN_SCALE, so a constant operand (``high == low``) gets a finite grid.
    """
    step = ((high - low) / ((1 << bits) - 1)).clamp_min(MIN_SCALE)
    return step, torch.round(-low / step) - qmax(bits)

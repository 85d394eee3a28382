"""Symmetric uniform quantization: the arithmetic every ptq4vit quantizer is built from.

Pure tensor functions, no state. A scale (Δ) broadcasts against the tensor it quantizes,
so one call serves per-tensor, per-group, per-head and per-channel granularity, and a
stack of candidate scales in the calibration search.

Scales are float32 whatever the model's dtype. Codes are computed in float32 from the
operand (a bf16/fp16 value is exact in float32) and dequantized values are rounded once to the
operand's dtype, so a half-precision forward, the calibration search (float32) and stored
integer codes all agree on every code (docs/method.md §1).
"""
from __future__ import annotations

import torch

from ..errors import UserError

MIN_BITS = 2
MAX_BITS = 8


def check_bits(bits: int, name: str = "bits") -> int:
    """Return ``bits`` if it is an integer in [MIN_BITS, MAX_BITS], else raise UserError naming it."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise UserError(f"{name} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return bits


def qmax(bits: int) -> int:
    """``2^(b-1)``: the codes of a signed b-bit quantizer are ``[-qmax, qmax - 1]``."""
    return 1 << (bits - 1)


#: The smallest scale any search starts from or tries: the smallest normal float32. An all-zero
#: operand (a zero-initialised head, a dead channel) has max|x| = 0, and Δ = 0 would turn its
#: codes into 0/0 = NaN; any positive Δ quantizes zeros exactly (docs/method.md §2).
MIN_SCALE = torch.finfo(torch.float32).tiny


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype codes are computed in: float32, or wider if ``x`` is wider."""
    return torch.promote_types(x.dtype, torch.float32)


def initial_scale(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """The search's starting point ``Δ0 = max|x| / (qmax - 0.5)``, at least MIN_SCALE (docs/method.md §2)."""
    return (absmax / (qmax(bits) - 0.5)).clamp_min(MIN_SCALE)


def uniform_codes(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``clamp(round(x / Δ), -qmax, qmax - 1)`` as float32 (float64 for a float64 x)."""
    q = qmax(bits)
    return torch.round(x.to(compute_dtype(x)) / scale).clamp_(-q, q - 1)


def uniform_dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codes · Δ`` in float32, rounded once to ``dtype``; overwrites ``codes`` when it is float."""
    values = codes.mul_(scale) if codes.is_floating_point() else codes.to(torch.float32).mul_(scale)
    return values.to(dtype)


def uniform_fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``q(x) = clamp(round(x / Δ), -qmax, qmax - 1) · Δ`` in x's dtype (docs/method.md §1).

    Defined as :func:`uniform_dequantize` of :func:`uniform_codes`, so a forward pass and
    stored codes agree by construction in every dtype.
    """
    return uniform_dequantize(uniform_codes(x, scale, bits), scale, x.dtype)


def candidate_factors(alpha: float, beta: float, n: int) -> torch.Tensor:
    """Multipliers of Δ0 tried by the search: ``α + i(β-α)/n`` for ``i = 0..n-1`` (β excluded)."""
    i = torch.arange(n, dtype=torch.float64)
    return (alpha + i * (beta - alpha) / n).to(torch.float32)

"""Symmetric uniform quantization: the arithmetic every ptq4vit quantizer is built from.

Pure tensor functions, no state. A scale (Δ) broadcasts against the tensor it quantizes,
so one call serves per-tensor, per-group, per-head and per-channel granularity, and a
stack of candidate scales in the calibration search.
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


def initial_scale(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """The search's starting point ``Δ0 = max|x| / (qmax - 0.5)`` (docs/method.md §2)."""
    return absmax / (qmax(bits) - 0.5)


def uniform_codes(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``clamp(round(x / Δ), -qmax, qmax - 1)``, kept in x's float dtype."""
    q = qmax(bits)
    return torch.round(x / scale).clamp_(-q, q - 1)


def uniform_fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``q(x) = clamp(round(x / Δ), -qmax, qmax - 1) · Δ`` (docs/method.md §1)."""
    return uniform_codes(x, scale, bits).mul_(scale)


def candidate_factors(alpha: float, beta: float, n: int) -> torch.Tensor:
    """Multipliers of Δ0 tried by the search: ``α + i(β-α)/n`` for ``i = 0..n-1`` (β excluded)."""
    i = torch.arange(n, dtype=torch.float64)
    return (alpha + i * (beta - alpha) / n).to(torch.float32)

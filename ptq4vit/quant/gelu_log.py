"""Log-domain quantizer for post-GELU values, the input of fc2 (docs/lowbit.md §8).

GELU's outputs lie in ``[-0.17, max]``; most are tiny and a few are large. A uniform grid
spends its codes on the rare large values; a log grid ``Δ · b^-e`` (``b = 2`` or ``√2``) under a
calibrated largest level ``Δ`` resolves the small ones relatively. The negative side is
GELU's bounded dip, quantized as the post-GELU twin quantizer does (docs/method.md §4): a
uniform grid of fixed step ``Δ- = 0.17 / qmax``.

One signed ``bits``-bit code ``c`` in ``[-qmax, qmax - 1]`` (``qmax = 2^(bits-1)``), monotone in
the value it stands for:

* ``c < 0``: ``c · Δ-`` (``qmax`` negative levels, down to GELU's minimum);
* ``c = 0``: zero, also for positive values that round past the smallest level;
* ``c > 0``: ``Δ · b^(c - (qmax - 1))`` (``qmax - 1`` levels, ``Δ`` the largest; larger values clip to it).

Positive values are rounded in the log domain, ``e = round(log_b(x / Δ))``, as the post-softmax
log quantizer rounds (:mod:`.log`). Codes are computed in float32 whatever x's dtype and the
value is rounded once to x's dtype, as for every other quantizer (docs/method.md §1).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .log import LOG_BASES
from .quantizers import PostGeluQuantizer
from .search_space import ScaleSearch
from .uniform import MIN_SCALE, compute_dtype, qmax


def _codes_per_halving(base: str) -> float:
    """Log-domain codes per halving of the value: 1 (``log2``) or 2 (``log_sqrt2``)."""
    if base not in LOG_BASES:
        raise ValueError(f"log quantizer base must be one of {tuple(LOG_BASES)}, got {base!r}")
    return 1.0 / math.log2(LOG_BASES[base])


def gelu_log_codes(x: torch.Tensor, scale: torch.Tensor, neg_step: float | torch.Tensor, bits: int,
                   base: str) -> torch.Tensor:
    """Signed codes (float32 values, float64 for a float64 x) of the module doc.

    ``scale`` (Δ, the largest positive level) broadcasts against x, so a stack of candidate
    scales with a leading dim yields the codes of every candidate in one call.
    """
    q = qmax(bits)
    per_halving = _codes_per_halving(base)
    xf = x.to(compute_dtype(x))
    # log2 of x/Δ <= 0 is -inf (never NaN): such values get no positive code.
    pos = torch.log2((xf / scale).clamp_(min=0)).mul_(per_halving).round_().add_(q - 1).clamp_(max=q - 1)
    pos = torch.where(pos >= 1, pos, torch.zeros((), dtype=pos.dtype, device=pos.device))
    neg = torch.round(xf / neg_step).clamp_(-q, 0)   # 0 for every positive value
    return pos.add_(neg)


def gelu_log_dequantize(codes: torch.Tensor, scale: torch.Tensor, neg_step: float | torch.Tensor, bits: int,
                        base: str, dtype: torch.dtype) -> torch.Tensor:
    """The values of ``codes`` computed in float32 (float64 codes: float64), rounded once to ``dtype``."""
    q = qmax(bits)
    per_halving = _codes_per_halving(base)
    c = codes if codes.is_floating_point() else codes.to(torch.float32)
    # pow, not exp2: ONNX has no Exp2 (the site is exported as these float ops, docs/lowbit.md §8)
    pos = torch.pow(2.0, (c - (q - 1)).div_(per_halving)).mul_(scale)
    return torch.where(c > 0, pos, c * neg_step).to(dtype)


def gelu_log_fake_quant(x: torch.Tensor, scale: torch.Tensor, neg_step: float | torch.Tensor, bits: int,
                        base: str) -> torch.Tensor:
    """:func:`gelu_log_dequantize` of :func:`gelu_log_codes`, in x's dtype."""
    return gelu_log_dequantize(gelu_log_codes(x, scale, neg_step, bits, base), scale, neg_step, bits, base, x.dtype)


class GeluLogQuantizer(PostGeluQuantizer):
    """Post-GELU log quantizer (base 2 or √2): a searched largest level ``scale`` (Δ) and the
    post-GELU twin's fixed negative step ``neg_scale`` (Δ-); see the module doc."""

    #: the codes, the positive and negative values and their selection
    search_copies = 4

    def __init__(self, bits: int, base: str = "log2", device: Optional[torch.device] = None):
        super().__init__(bits, device)
        _codes_per_halving(base)
        self.base = base

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Signed codes of ``x`` (float32 values, shape of x)."""
        return gelu_log_codes(x, self.scale, self.neg_scale, self.bits, self.base)

    def dequantize(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return gelu_log_dequantize(codes, self.scale, self.neg_scale, self.bits, self.base, dtype)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.codes(x), x.dtype)

    def spec_fields(self) -> dict:
        return {"base": self.base}

    def qparams(self, role: str) -> dict:
        return {**super().qparams(role), f"{role}_log": self.base}

    def scale_search(self, x: torch.Tensor) -> ScaleSearch:
        """Candidates around the largest value: Δ is the largest level (docs/lowbit.md §8)."""
        neg, bits, base = self.neg_scale.to(x), self.bits, self.base
        return ScaleSearch(lambda t, s: gelu_log_fake_quant(t, s, neg, bits, base), self.set_scale,
                           start=x.max().reshape(1).clamp_min(MIN_SCALE))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, base={self.base}"

"""Log-domain quantizer for post-softmax values (docs/lowbit.md §4).

Attention probabilities lie in ``[0, 1]`` and most are tiny; a uniform grid spends its codes
on the rare large values. A log grid ``b^-c`` (``b = 2`` or ``√2``, ``c = 0 .. 2^bits - 2``)
resolves small probabilities relatively, and the last code stands for 0 (values that round
past the smallest level). Nothing is calibrated: the range of softmax is fixed.
"""
from __future__ import annotations

import math

import torch

from .quantizers import Quantizer
from .uniform import check_bits

LOG_BASES = {"log2": 2.0, "log_sqrt2": math.sqrt(2.0)}


def log_codes(x: torch.Tensor, bits: int, base: str) -> torch.Tensor:
    """Codes ``clamp(round(-log_b x), 0, 2^bits - 1)``; the top code (and x <= 0) means 0."""
    top = (1 << bits) - 1
    per_log2 = 1.0 / math.log2(LOG_BASES[base])      # codes per halving: 1 (log2) or 2 (log√2)
    c = torch.round(-torch.log2(x.clamp_min(torch.finfo(x.dtype).tiny)) * per_log2)
    return c.clamp_(0, top).masked_fill_(x <= 0, top)


def log_fake_quant(x: torch.Tensor, bits: int, base: str) -> torch.Tensor:
    """``b^-c`` for the codes of :func:`log_codes`, 0 for the top code."""
    top = (1 << bits) - 1
    c = log_codes(x.float(), bits, base)  # codes in float32 whatever the operand dtype
    per_log2 = 1.0 / math.log2(LOG_BASES[base])
    return torch.pow(2.0, -c / per_log2).masked_fill_(c == top, 0.0).to(x.dtype)  # pow: ONNX has no exp2


class LogQuantizer(Quantizer):
    """Post-softmax log quantizer (base 2 or √2); has no calibrated parameter."""

    def __init__(self, bits: int, base: str = "log_sqrt2"):
        super().__init__(check_bits(bits))
        if base not in LOG_BASES:
            raise ValueError(f"log quantizer base must be one of {tuple(LOG_BASES)}, got {base!r}")
        self.base = base
        self.calibrated = True

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return log_fake_quant(x, self.bits, self.base)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, base={self.base}"

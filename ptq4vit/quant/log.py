"""Log-domain quantizer for post-softmax values (docs/lowbit.md §4).

Attention probabilities lie in ``[0, 1]`` and most are tiny; a uniform grid spends its codes
on the rare large values. A log grid ``b^-c`` (``b = 2`` or ``√2``, ``c = 0 .. 2^bits - 2``)
resolves small probabilities relatively, and the last code stands for 0 (values that round
past the smallest level). Nothing is calibrated: the range of softmax is fixed.

The *scaled* form is RepQ-ViT's released quantizer (docs/lowbit.md §6): levels ``Δ · b^-c`` under a
calibrated largest level ``Δ``, every one of the ``2^bits`` codes a level, and values that round
past the smallest level set to 0 apart from them (so it holds one value more than ``bits`` bits
code: the released code's count, kept to reproduce it).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .quantizers import Quantizer, floats
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


def scaled_log_fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int, base: str) -> torch.Tensor:
    """RepQ-ViT's log quantizer: ``c = round(-log_b(x / Δ))``; 0 where ``c >= 2^bits``, else
    ``Δ · b^-clamp(c, 0, 2^bits - 1)``. For ``√2`` the level is formed as the released code forms
    it, ``2^-ceil(c/2) · (√2 if c is odd else 1) · Δ`` in float32."""
    levels = 1 << bits
    per_log2 = 1.0 / math.log2(LOG_BASES[base])
    xf = x.float()
    c = torch.round(-torch.log2(xf / scale) * per_log2)
    zero = c >= levels
    c = c.clamp_(0, levels - 1)
    if per_log2 == 2.0:
        odd = torch.remainder(c, 2.0).mul_(math.sqrt(2.0) - 1.0).add_(1.0)
        value = torch.pow(2.0, -torch.ceil(c / 2.0)).mul_(odd).mul_(scale)
    else:
        value = torch.pow(2.0, -c / per_log2).mul_(scale)
    return value.masked_fill_(zero, 0.0).to(x.dtype)


class LogQuantizer(Quantizer):
    """Post-softmax log quantizer (base 2 or √2). Unscaled: no calibrated parameter, largest level 1.
    ``scaled=True``: a calibrated largest level ``scale`` (RepQ-ViT's form, see the module doc)."""

    def __init__(self, bits: int, base: str = "log_sqrt2", scaled: bool = False, device: Optional[torch.device] = None):
        super().__init__(check_bits(bits))
        if base not in LOG_BASES:
            raise ValueError(f"log quantizer base must be one of {tuple(LOG_BASES)}, got {base!r}")
        self.base = base
        self.scaled = scaled
        if scaled:
            self.register_buffer("scale", torch.ones((), dtype=torch.float32, device=device))
        self.calibrated = not scaled

    def set_scale(self, scale: torch.Tensor) -> None:
        self.scale.copy_(scale.reshape(()))
        self.calibrated = True

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        if self.scaled:
            return scaled_log_fake_quant(x, self.scale, self.bits, self.base)
        return log_fake_quant(x, self.bits, self.base)

    def spec_fields(self) -> dict:
        # (the base is the preset's, stored with it; a spec without it is what format 2 checkpoints hold)
        return {"scaled": True} if self.scaled else {}

    def qparams(self, role: str) -> dict:
        return {f"{role}_log": self.base, **({f"{role}_scale": floats(self.scale)} if self.scaled else {})}

    def extra_repr(self) -> str:
        return f"bits={self.bits}, base={self.base}, scaled={self.scaled}"

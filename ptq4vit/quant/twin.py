"""Twin uniform quantizers (PTQ4ViT §3.2): two uniform ranges whose steps differ by a power of two.

* After softmax (values in [0, 1]): ``R1 = [0, s)`` with step ``s / (qmax-1)`` and
  ``R2 = [s, 1]`` with step ``1 / (qmax-1)``, ``s = 2^-i``. With a ``top`` ``t`` (docs/lowbit.md
  §12) both ranges shrink by ``t``: ``R1 = [0, s·t)``, ``R2 = [s·t, t]``, values above ``t`` clipped;
  the steps still differ by ``2^i``.
* After GELU: a fixed negative range (GELU's minimum is about -0.17) and a searched
  positive range.

Both softmax forms are here: ``"select"`` (each value quantized in its own region, what the
paper describes) and ``"sum"`` (the released code's ``hi + lo``, which offsets every value;
kept so the ``official`` preset reproduces the published numbers).
"""
from __future__ import annotations

from typing import Literal, Optional

import torch

from .uniform import compute_dtype, qmax

SoftmaxTwinForm = Literal["select", "sum"]

#: |min GELU(x)| over the reals, the fixed negative range of the post-GELU twin quantizer.
GELU_NEG_RANGE = 0.16997124254703522

#: Splits ``s = 2^-i`` tried for the softmax twin quantizer, i = 0..19.
SOFTMAX_SPLIT_EXPONENTS = tuple(range(20))

#: Tops ``t = 2^(-j/2)`` tried for a softmax twin with a top, j = 0..8 (1 down to 1/16).
SOFTMAX_TOP_HALVINGS = tuple(range(9))


def softmax_split_candidates() -> torch.Tensor:
    return torch.tensor([2.0 ** -i for i in SOFTMAX_SPLIT_EXPONENTS], dtype=torch.float32)


def softmax_top_candidates() -> torch.Tensor:
    """Tops ``t = 2^(-j/2)``, j = 0..8, searched for a twin with a top (1 is the plain twin)."""
    return torch.tensor([2.0 ** (-j / 2) for j in SOFTMAX_TOP_HALVINGS], dtype=torch.float32)


def softmax_twin_steps(split: torch.Tensor, bits: int,
                       top: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ_R1, Δ_R2) for a split ``s``: ``s / (qmax-1)`` and ``1 / (qmax-1)``; with a ``top`` ``t``,
    ``s·t / (qmax-1)`` and ``t / (qmax-1)``."""
    levels = qmax(bits) - 1
    if top is None:
        return split / levels, torch.ones_like(split) / levels
    return split * top / levels, top / levels


def softmax_twin_codes(x: torch.Tensor, split: torch.Tensor, bits: int,
                       top: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Region-selected codes ``(lo, hi)``: ``lo`` counts Δ_R1 steps where ``x < s`` (``x < s·t`` with a
    top; else 0), ``hi`` counts Δ_R2 steps elsewhere (else 0). Both lie in ``[0, qmax-1]``: with a top,
    values above it take the largest ``hi`` code.

    Both branches divide by their float32 step, as ``QuantizeLinear`` does: ``x * (qmax-1)`` for
    the ``hi`` branch would differ from ``x / Δ_R2`` next to .5 boundaries, since ``Δ_R2 = 1/127``
    is not exact in float32 (docs/method.md §3).

    The dequantized value is ``lo·Δ_R1 + hi·Δ_R2``; since ``Δ_R2 = 2^i Δ_R1`` it is also
    ``(lo + (hi << i))·Δ_R1``, which is what integer kernels use.
    """
    levels = qmax(bits) - 1
    step_lo, step_hi = softmax_twin_steps(split, bits, top)
    x = x.to(compute_dtype(x))  # the split is a 0-d float32 tensor: it would not promote a half x
    below = x < (split if top is None else split * top)
    zero = x.new_zeros(())
    lo = torch.where(below, torch.round(x / step_lo).clamp_(0, levels), zero)
    hi = torch.where(below, zero, torch.round(x / step_hi).clamp_(0, levels))
    return lo, hi


def softmax_twin_fake_quant(x: torch.Tensor, split: torch.Tensor, bits: int, form: SoftmaxTwinForm = "select",
                            top: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fake-quantize post-softmax values with the twin uniform quantizer (docs/method.md §3), with
    a ``top`` (``"select"`` only) as :func:`softmax_twin_codes`.

    Computed in float32 and rounded once to x's dtype, like :func:`.uniform.uniform_fake_quant`.
    """
    levels = qmax(bits) - 1
    step_lo, step_hi = softmax_twin_steps(split, bits, top)
    if form == "select":
        lo, hi = softmax_twin_codes(x, split, bits, top)
        return lo.mul_(step_lo).add_(hi.mul_(step_hi)).to(x.dtype)
    if top is not None:
        raise ValueError("a softmax twin top is a setting of the 'select' form only")
    if form == "sum":
        xf = x.to(compute_dtype(x))
        zero = torch.zeros_like(split)
        one = torch.ones_like(split)
        # the released code's arithmetic, kept exactly: x·(qmax-1), dequantized by a division
        hi = torch.round(torch.clamp(xf, split, one) * levels) / levels
        lo = torch.round(torch.clamp(xf, zero, split) / step_lo).clamp_(0, levels).mul_(step_lo)
        return hi.add_(lo).to(x.dtype)
    raise ValueError(f"softmax twin form must be 'select' or 'sum', got {form!r}")


def gelu_twin_neg_step(bits: int) -> float:
    """Δ- of the post-GELU twin quantizer: the fixed negative range over qmax codes."""
    return GELU_NEG_RANGE / qmax(bits)


def gelu_twin_codes(x: torch.Tensor, pos_step: torch.Tensor, neg_step: float | torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pos, neg)`` codes: ``clamp(round(x/Δ+), 0, qmax-1)`` and ``clamp(round(x/Δ-), -qmax, 0)``."""
    q = qmax(bits)
    x = x.to(compute_dtype(x))
    pos = torch.round(x / pos_step).clamp_(0, q - 1)
    neg = torch.round(x / neg_step).clamp_(-q, 0)
    return pos, neg


def gelu_twin_fake_quant(x: torch.Tensor, pos_step: torch.Tensor, neg_step: float | torch.Tensor, bits: int) -> torch.Tensor:
    """Positive part plus negative part (docs/method.md §4); exactly one of them is non-zero per value."""
    pos, neg = gelu_twin_codes(x, pos_step, neg_step, bits)
    return pos.mul_(pos_step).add_(neg.mul_(neg_step)).to(x.dtype)


def pow2_snap(pos_step: torch.Tensor, neg_step: float) -> torch.Tensor:
    """The nearest (in log2) ``Δ+ = 2^m Δ-``, which lets integer kernels combine the two parts with a shift."""
    m = torch.round(torch.log2(pos_step / neg_step))
    return neg_step * torch.pow(2.0, m)


def pow2_candidates(grid: torch.Tensor, neg_step: torch.Tensor) -> torch.Tensor:
    """The values ``2^m Δ-`` inside the range of the candidate steps ``grid`` (the one nearest their
    mean, in log2, if none is inside): a power-of-two post-GELU twin's search candidates."""
    lo, hi = grid.min(), grid.max()
    exps = torch.arange(int(torch.floor(torch.log2(lo / neg_step))), int(torch.ceil(torch.log2(hi / neg_step))) + 1,
                        device=grid.device, dtype=grid.dtype)
    cands = neg_step * torch.pow(2.0, exps)
    inside = cands[(cands >= lo) & (cands <= hi)]
    if inside.numel():
        return inside
    return cands[(torch.log2(cands) - torch.log2(grid.mean())).abs().argmin()].reshape(1)

"""Differentiable stand-ins for the quantizers, used while reconstruction learns (docs/lowbit.md §11).

A calibrated quantizer rounds with ``torch.round``, whose gradient is zero: nothing upstream of
it can learn. While a block is reconstructed its quantizers are temporarily replaced
(:mod:`ptq4vit.calib.reconstruct` swaps them in and back) by:

* :class:`LearningWeight`: a weight's rounding learned on the calibrated grid (AdaRound, Nagel et
  al. 2020): ``codes = clamp(floor(W/Δ) + h(V) + z)``, ``h`` a rectified sigmoid of a free ``V`` per
  weight, annealed to hard (``h`` in {0, 1}) by :func:`rounding_regularizer`; the hard codes are
  what :meth:`LearningWeight.hard_codes` gives and what the weight is rewritten to.
* :class:`SignRoundingWeight`: a weight's rounding learned on the same grid with the hard rounding in
  every forward (SignRound, Cheng et al. 2023): ``codes = clamp(round(W/Δ + V) + z)``, ``V`` in
  [-1/2, 1/2] moved by the sign of its gradient (straight through ``round``): what it learns on is
  what it writes;
* :class:`LearningActivation`: an activation quantizer whose step is learned (LSQ, Esser et al.
  2020: the gradient reaches the step through ``round`` by the straight-through estimator) or held
  fixed, optionally with QDrop (Wei et al. 2022: each value keeps its float value with probability
  ``p``).

What each kind learns is registered per kind (:data:`STEP_RULES`, :data:`WEIGHT_GRIDS`); a kind
with no rule is held fixed, its gradient passed straight through. Nothing here changes a
quantizer's normal forward: a model that is not being reconstructed computes what it always did.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from torch import nn

from .gelu_log import GeluLogQuantizer, _codes_per_halving
from .log import LOG_BASES, LogQuantizer
from .quantizers import (AsymmetricQuantizer, Quantizer, TwinGeluQuantizer, TwinSoftmaxQuantizer, UniformQuantizer,
                         group_view, scale_view)
from .registry import KindRegistry
from .twin import softmax_twin_steps
from .uniform import MIN_SCALE, qmax

#: The rectified sigmoid's stretch (AdaRound): ``h = clamp(sigmoid(V)(ζ - γ) + γ, 0, 1)`` reaches 0 and 1
#: at finite ``V``, so the regularizer can make every ``h`` exactly hard.
ZETA, GAMMA = 1.1, -0.1


class _RoundStraightThrough(torch.autograd.Function):
    """``round(x)`` forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _ValueStraightThrough(torch.autograd.Function):
    """Forward: ``value`` (computed without a gradient); backward: the gradient goes to ``x`` unchanged."""

    @staticmethod
    def forward(ctx, x, value):
        return value.clone()

    @staticmethod
    def backward(ctx, g):
        return g, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``torch.round(x)``, bit for bit, with the gradient of the identity."""
    return _RoundStraightThrough.apply(x)


def straight_through(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` with ``x``'s gradient passed through unchanged (a quantizer held fixed)."""
    return _ValueStraightThrough.apply(x, value)


def soft_rounding(v: torch.Tensor) -> torch.Tensor:
    """AdaRound's ``h(V) = clamp(sigmoid(V)(ζ - γ) + γ, 0, 1)``, in [0, 1]."""
    return torch.sigmoid(v).mul(ZETA - GAMMA).add(GAMMA).clamp(0.0, 1.0)


def soft_rounding_start(rest: torch.Tensor) -> torch.Tensor:
    """The ``V`` with ``h(V) = rest`` for ``rest`` in [0, 1): learning starts at the float weight."""
    p = (rest - GAMMA) / (ZETA - GAMMA)
    return torch.log(p / (1.0 - p))


def hard_rounding(v: torch.Tensor) -> torch.Tensor:
    """What ``h(V)`` anneals to: 1 where ``V >= 0`` (``h >= 0.5``), else 0."""
    return (v >= 0).to(v.dtype)


def rounding_regularizer(v: torch.Tensor, beta: float) -> torch.Tensor:
    """``Σ 1 - |2h(V) - 1|^β``: zero exactly when every ``h`` is 0 or 1; a falling ``β`` pushes the ``h``
    that are still soft towards the nearer end."""
    return (1.0 - (2.0 * soft_rounding(v) - 1.0).abs().pow(beta)).sum()


# ---- weights: the grid a weight's codes live on

@dataclass(frozen=True)
class WeightGrid:
    """A weight's codes are ``clamp(round(W/step) + zero, low, high)`` and stand for ``(codes - zero) · step``;
    ``step`` and ``zero`` broadcast against the weight (a column of per-row values, or a scalar)."""

    step: torch.Tensor
    zero: torch.Tensor
    low: int
    high: int


def _row_values(values: torch.Tensor, q: Quantizer, weight: torch.Tensor) -> torch.Tensor:
    """A ``(groups,)`` buffer as a column against the weight's rows (``(rows, 1)`` for a linear layer's
    weight, ``(rows, 1, 1, 1)`` for a convolution's), or a scalar for a per-tensor quantizer."""
    if q.axis is None:
        return values.reshape(())
    if q.axis != 0:
        raise NotImplementedError(f"learned rounding of a weight grouped along axis {q.axis}")
    return values.repeat_interleave(weight.shape[0] // values.numel()).reshape(-1, *[1] * (weight.dim() - 1))


#: How to read the grid off a weight quantizer, per kind; a kind without one keeps its rounding.
WEIGHT_GRIDS: KindRegistry[Callable[[Quantizer, torch.Tensor], WeightGrid]] = KindRegistry("learned weight rounding")


@WEIGHT_GRIDS.registering(UniformQuantizer)
def _uniform_grid(q: UniformQuantizer, weight: torch.Tensor) -> WeightGrid:
    step = _row_values(q.scale, q, weight)
    return WeightGrid(step, torch.zeros((), dtype=step.dtype, device=step.device), -qmax(q.bits), qmax(q.bits) - 1)


@WEIGHT_GRIDS.registering(AsymmetricQuantizer)
def _asymmetric_grid(q: AsymmetricQuantizer, weight: torch.Tensor) -> WeightGrid:
    return WeightGrid(_row_values(q.scale, q, weight), _row_values(q.zero_point, q, weight),
                      -qmax(q.bits), qmax(q.bits) - 1)


class LearningWeight(nn.Module):
    """Stands in for a weight quantizer: ``(clamp(floor(W/Δ) + h(V) + z) - z) · Δ``, ``h`` soft or hard.

    ``V`` starts where ``h`` equals the fractional part of ``W/Δ`` for the ``weight`` given (the soft
    weight is that weight up to the clamp: the float weight, or GPTQ's before rounding); :meth:`hard_codes`
    are the codes the learned rounding gives.
    """

    def __init__(self, quantizer: Quantizer, weight: torch.Tensor, grid: WeightGrid):
        super().__init__()
        self.quantizer = quantizer
        self.enabled = quantizer.enabled
        self.grid = grid
        x = weight.detach().to(torch.float32) / grid.step
        self.register_buffer("base", torch.floor(x))
        self.v = nn.Parameter(soft_rounding_start(x - self.base))
        self.s: Optional[nn.Parameter] = None  # the step is never learned with a soft rounding
        self.soft = True

    def learned_scale(self) -> Optional[torch.Tensor]:
        return None

    def codes(self, h: torch.Tensor) -> torch.Tensor:
        return (self.base + h + self.grid.zero).clamp(self.grid.low, self.grid.high)

    def hard_codes(self) -> torch.Tensor:
        return self.codes(hard_rounding(self.v.detach()))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        h = soft_rounding(self.v) if self.soft else hard_rounding(self.v)
        return ((self.codes(h) - self.grid.zero) * self.grid.step).to(w.dtype)


class SignRoundingWeight(nn.Module):
    """Stands in for a weight quantizer with a hard rounding learned by its sign gradient (SignRound,
    Cheng et al. 2023): ``(clamp(round(W/Δ + V) + z) - z) · Δ``, ``V`` in [-0.5, 0.5] starting at 0.

    Every forward is the quantized weight itself (the gradient reaches ``V`` straight through
    ``round``), so the error learned against is the error of the codes written at the end: no soft
    weight to anneal, no gap between what was learned and what is kept. ``V`` spans one step, so each
    weight ends on one of the two codes around ``W/Δ``: the same choice AdaRound has.

    With ``learn_step`` the step of each group of the quantizer (each row, per channel) is learned
    too, as ``Δ · exp(s)`` (LSQ's gradient through ``round``), and the two codes are those around
    ``W/Δ'`` for the current step ``Δ'``: the grid moves, its kind (steps, zero points, codes) does not.
    """

    def __init__(self, quantizer: Quantizer, weight: torch.Tensor, grid: WeightGrid, learn_step: bool = False):
        super().__init__()
        self.quantizer = quantizer
        self.enabled = quantizer.enabled
        self.grid = grid
        self.v = nn.Parameter(torch.zeros_like(weight, dtype=torch.float32))
        self.s: Optional[nn.Parameter] = None
        if learn_step:  # W/Δ' changes with the step: keep W
            self.register_buffer("start", weight.detach().to(torch.float32))
            self.s = nn.Parameter(torch.zeros_like(quantizer.scale))
        else:  # the grid is fixed: W/Δ and its floor once
            self.register_buffer("scaled", weight.detach().to(torch.float32) / grid.step)
            self.register_buffer("base", torch.floor(self.scaled))

    def step(self) -> torch.Tensor:
        """The grid's step, learned (a column of per-row values, or a scalar) or as calibrated."""
        if self.s is None:
            return self.grid.step
        return self.grid.step * _row_values(torch.exp(self.s), self.quantizer, self.start)

    def _scaled_and_base(self, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``W/Δ'`` and its floor for the current ``step()`` (passed in: the forward uses it twice)."""
        if self.s is None:
            return self.scaled, self.base
        scaled = self.start / step
        return scaled, torch.floor(scaled.detach())

    def codes(self, rounded: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        # round(W/Δ ± 1/2) can tie to a third code where W/Δ is an integer: keep to floor and floor + 1
        # (torch.where, not clamp: clamp halves the gradient where the code sits on a bound)
        neighbour = torch.where(rounded < base, base, torch.where(rounded > base + 1, base + 1, rounded))
        return (neighbour + self.grid.zero).clamp(self.grid.low, self.grid.high)

    def hard_codes(self) -> torch.Tensor:
        with torch.no_grad():
            scaled, base = self._scaled_and_base(self.step())
            return self.codes(torch.round(scaled + self.v), base)

    def unrounded(self) -> torch.Tensor:
        """The weight the hard rounding rounds to nearest, ``(W/Δ' + V) · Δ'``: where a later stage that
        learns the rounding again starts (its ``V = 0`` then gives the codes learned here, ties aside)."""
        with torch.no_grad():
            step = self.step()
            scaled, _ = self._scaled_and_base(step)
            return (scaled + self.v) * step

    def learned_scale(self) -> Optional[torch.Tensor]:
        """The learned steps to write into the quantizer's ``scale`` (None when the step is not learned)."""
        return None if self.s is None else (self.quantizer.scale * torch.exp(self.s)).detach()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        step = self.step()
        scaled, base = self._scaled_and_base(step)
        return ((self.codes(round_ste(scaled + self.v), base) - self.grid.zero) * step).to(w.dtype)

    @torch.no_grad()
    def sign_step(self, lr: float) -> None:
        """One signed-gradient step, ``V`` kept within half a step of the start."""
        if self.v.grad is not None:
            self.v.sub_(self.v.grad.sign(), alpha=lr).clamp_(-0.5, 0.5)


#: The stand-in for each way of learning the rounding (``Reconstruction.rounding``).
ROUNDING_LEARNERS: dict[str, type[nn.Module]] = {"adaround": LearningWeight, "sign": SignRoundingWeight}


# ---- activations: the step a kind learns

@dataclass(frozen=True)
class StepRule:
    """How a kind of activation quantizer learns its step.

    ``buffer``: the learned buffer (its values stay positive: they are learned as ``Δ0 · exp(u)``);
    ``fake_quant(q, x, step)``: its fake quantization with ``step`` in place of the buffer,
    differentiable in ``step`` and (straight through ``round``) in ``x``; ``family``: ``"uniform"``, or
    ``"twin_log"`` for the twin and log kinds that ``learn_twin_log`` may hold fixed;
    ``learnable(q)``: False where this quantizer's step must not move (a power-of-two constraint).
    """

    buffer: str
    fake_quant: Callable[[Quantizer, torch.Tensor, torch.Tensor], torch.Tensor]
    family: Literal["uniform", "twin_log"]
    learnable: Callable[[Quantizer], bool] = lambda q: True


#: The activation kinds whose step can be learned. A kind without a rule (an unscaled log quantizer, a kind
#: registered elsewhere) is held fixed, and so is a softmax twin without a top (its split is a power of two
#: by design; with a top, the top is learned).
STEP_RULES: KindRegistry[StepRule] = KindRegistry("learned activation step")


def _uniform_learn(q: UniformQuantizer, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    n = qmax(q.bits)
    s = scale_view(step, q.axis, x.dim())
    codes = round_ste(group_view(x.to(torch.float32), q.axis, q.groups) / s).clamp(-n, n - 1)
    return (codes * s).reshape(x.shape).to(x.dtype)


def _asymmetric_learn(q: AsymmetricQuantizer, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    n = qmax(q.bits)
    s, z = scale_view(step, q.axis, x.dim()), scale_view(q.zero_point, q.axis, x.dim())
    codes = (round_ste(group_view(x.to(torch.float32), q.axis, q.groups) / s) + z).clamp(-n, n - 1)
    return ((codes - z) * s).reshape(x.shape).to(x.dtype)


def _twin_gelu_learn(q: TwinGeluQuantizer, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    n = qmax(q.bits)
    xf = x.to(torch.float32)
    pos = round_ste(xf / step).clamp(0, n - 1) * step
    neg = round_ste(xf / q.neg_scale).clamp(-n, 0) * q.neg_scale
    return (pos + neg).to(x.dtype)


def _gelu_log_learn(q: GeluLogQuantizer, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    n, per_halving = qmax(q.bits), _codes_per_halving(q.base)
    xf = x.to(torch.float32)
    exponent = round_ste(torch.log2((xf / step).clamp_min(MIN_SCALE)) * per_halving).add(n - 1).clamp(max=n - 1)
    pos = torch.where(exponent >= 1, torch.pow(2.0, (exponent - (n - 1)) / per_halving) * step, xf.new_zeros(()))
    neg = round_ste(xf / q.neg_scale).clamp(-n, 0) * q.neg_scale
    return torch.where(xf > 0, pos, neg).to(x.dtype)


def _scaled_log_learn(q: LogQuantizer, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    levels, per_halving = 1 << q.bits, 1.0 / math.log2(LOG_BASES[q.base])
    xf = x.to(torch.float32)
    c = round_ste(-torch.log2((xf / step).clamp_min(MIN_SCALE)) * per_halving)
    value = torch.pow(2.0, -c.clamp(0, levels - 1) / per_halving) * step
    return torch.where(c >= levels, xf.new_zeros(()), value).to(x.dtype)


def _twin_softmax_learn(q: TwinSoftmaxQuantizer, x: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """The twin with its top learned (the split stays the power of two it was searched as)."""
    levels = qmax(q.bits) - 1
    xf = x.to(torch.float32)
    step_lo, step_hi = softmax_twin_steps(q.split, q.bits, top)
    below = xf < (q.split * top).detach()
    lo = round_ste(xf / step_lo).clamp(0, levels) * step_lo
    hi = round_ste(xf / step_hi).clamp(0, levels) * step_hi
    return torch.where(below, lo, hi).to(x.dtype)


STEP_RULES.register(UniformQuantizer, StepRule("scale", _uniform_learn, "uniform"))
STEP_RULES.register(AsymmetricQuantizer, StepRule("scale", _asymmetric_learn, "uniform"))
STEP_RULES.register(TwinGeluQuantizer, StepRule("scale", _twin_gelu_learn, "twin_log", lambda q: not q.pow2))
STEP_RULES.register(GeluLogQuantizer, StepRule("scale", _gelu_log_learn, "twin_log"))
STEP_RULES.register(LogQuantizer, StepRule("scale", _scaled_log_learn, "twin_log", lambda q: q.scaled))
STEP_RULES.register(TwinSoftmaxQuantizer, StepRule("top", _twin_softmax_learn, "twin_log", lambda q: q.has_top))


class LearningActivation(nn.Module):
    """Stands in for an activation quantizer: its step learned (``rule`` given and ``learn``), or held
    fixed with the gradient passed straight through; with ``drop > 0`` (QDrop) each value keeps its
    float value with that probability (drawn from ``generator``).

    A learned step is ``Δ0 · exp(u)`` with ``u = 0`` at the start (exactly Δ0), so every step
    stays positive and one learning rate fits steps of any magnitude.
    """

    def __init__(self, quantizer: Quantizer, rule: Optional[StepRule], learn: bool,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        self.quantizer = quantizer
        self.enabled = quantizer.enabled
        self.rule = rule
        self.generator = generator
        self.drop = 0.0
        start = getattr(quantizer, rule.buffer) if rule is not None else None
        self.u = nn.Parameter(torch.zeros_like(start)) if learn and rule is not None else None

    def step(self) -> torch.Tensor:
        start = getattr(self.quantizer, self.rule.buffer)
        return start if self.u is None else start * torch.exp(self.u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.rule is not None:
            out = self.rule.fake_quant(self.quantizer, x, self.step())
        else:
            out = straight_through(x, self.quantizer.fake_quant(x.detach()))
        if self.drop > 0:
            keep = torch.rand(x.shape, generator=self.generator, device=x.device) < self.drop
            out = torch.where(keep, x, out)
        return out

    def learned_step(self) -> Optional[torch.Tensor]:
        """The learned step to write into the quantizer's buffer (None when nothing was learned)."""
        return None if self.u is None else self.step().detach()


__all__ = ["GAMMA", "ZETA", "ROUNDING_LEARNERS", "STEP_RULES", "WEIGHT_GRIDS", "LearningActivation", "LearningWeight", "SignRoundingWeight", "StepRule",
           "WeightGrid", "hard_rounding", "round_ste", "rounding_regularizer", "soft_rounding", "soft_rounding_start",
           "straight_through"]

"""Block reconstruction after calibration (docs/lowbit.md §11): off, or learned rounding and steps.

The options are the recipe's ``reconstruction`` slot: ``none`` (the default: calibration's result
as it is) or ``learned``, whose fields say what :func:`ptq4vit.reconstruct` learns and for how long.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, fields, replace
from typing import Literal, Optional, Union

from ..errors import UserError
from ..typecheck import check_fields
from .component import Component


@dataclass(frozen=True)
class NoReconstruction(Component):
    """No reconstruction: the calibrated weights and steps are the result."""
    variant = "none"

    def learns_rounding(self) -> bool:
        return False


@dataclass(frozen=True)
class Reconstruction(Component):
    """Learn, unit by unit, each weight's rounding (by the gradient's sign, or AdaRound) and the activation
    steps (LSQ) against the unit's output error on a pool of images (docs/lowbit.md §11).

    The defaults are sized for a ViT-S (12 blocks, 257 tokens) on 2 CPU cores; the time is about
    ``units × (iterations × t_step + images × t_image)``, the two costs of one block printed by
    ``benchmarks/reconstruct_speed.py``.
    """
    variant = "learned"

    #: Optimization steps per unit.
    iterations: int = 200
    #: Images per step (drawn with replacement from the pool).
    batch_size: int = 8
    #: Images in the pool (the first this many of the images given; fewer if fewer are given).
    images: int = 512
    #: The rounding variables' rate: Adam's learning rate of ``V`` with ``"adaround"`` (AdaRound's 1e-3 is
    #: for 20k steps); with ``"sign"``, how far ``V`` moves (in steps of the grid) at the first iteration,
    #: falling linearly to 0: 5e-3 over 200 iterations lets ``V`` move about half a step.
    lr_rounding: float = 5e-3
    #: Adam learning rate of the log-steps ``u`` (a step is ``Δ0 · exp(u)``: a relative rate).
    lr_steps: float = 1e-3
    #: Adam learning rate of the linear layers' biases (absolute: a bias moves about this much per step).
    lr_bias: float = 1e-3
    #: Learn each weight's rounding (False: the calibrated weights are kept bit for bit).
    learn_rounding: bool = True
    #: Learn each weight group's step (each row's, per channel) with the rounding, LSQ-style at ``lr_steps``
    #: (``rounding="sign"`` only): the grid moves, its kind (steps, zero points, codes) does not.
    learn_weight_steps: bool = False
    #: How the rounding is learned: ``"sign"`` (the hard rounding itself, moved by the gradient's sign
    #: at a rate falling linearly from ``lr_rounding`` to 0) or ``"adaround"`` (a soft rounding annealed
    #: to hard by a regularizer: ``warmup``, ``beta_start``, ``beta_end``, ``rounding_weight``; within
    #: the default iterations most of it is still soft when it is made hard, docs/lowbit.md §11).
    rounding: Literal["sign", "adaround"] = "sign"
    #: Learn the biases of the unit's linear layers (float in every export: nothing changes in kind).
    learn_bias: bool = False
    #: Learn the activation steps (False: every activation quantizer is held fixed).
    learn_steps: bool = True
    #: With ``learn_steps``, also learn the steps of twin and log quantizers (post-GELU twin without
    #: ``gelu_pow2``, post-GELU log, scaled post-softmax log, the softmax twin's top with ``softmax.top``);
    #: False holds them fixed.
    learn_twin_log: bool = True
    #: QDrop: the probability that a value keeps its float value in an activation quantizer while learning
    #: (0: off, the default: without it every block of the ViT-S/14 ends with a lower error, docs/results.md).
    qdrop: float = 0.0
    #: A unit's inputs: from the quantized preceding units (``"quantized"``) or from the float model (``"float"``).
    inputs: Literal["quantized", "float"] = "quantized"
    #: Reconstruct whole blocks, or each residual branch (attention, MLP) on its own.
    unit: Literal["block", "sublayer"] = "block"
    #: What the last unit (the model's last block, or that block's MLP branch) learns against: its whole
    #: output, every token (``"output"``), or the features the classifier reads of it (``"features"``: for
    #: a token-pooled ViT the final norm of its class token, for an average-pooled one the normed mean of
    #: its patch tokens), which the model's family adapter states; the tokens nothing reads then do not count.
    #: ``"auto"``: the features where the family states them (and ``fisher`` is off), else the whole output;
    #: the report says which (``"features"`` refuses a family that does not state them).
    last_unit: Literal["auto", "output", "features"] = "auto"
    #: Weight the output error by the diagonal Fisher (squared gradient of the float model's
    #: cross-entropy against its own prediction at the unit's output), normalized to mean 1: the
    #: error then counts where it moves the prediction, not where the output is merely large.
    fisher: bool = False
    #: Steps of a last stage over the whole model after the units (0: none): it learns what the units
    #: learned, at its own rates, against the KL divergence of the model's output from the float
    #: model's, so error a unit inherits and cannot undo on its own is learned against where it ends.
    network_iterations: int = 0
    #: In that stage, go on learning the weights' rounding from where the units left it (sign rounding
    #: only); False: only the activation steps (and biases with ``learn_bias``).
    network_rounding: bool = True
    #: The network stage's ``lr_rounding`` (the sign step's first rate, falling linearly to 0): far below
    #: the units' own, as every weight of the model moves by the sign of one batch's gradient at once.
    network_lr_rounding: float = 1e-4
    #: The network stage's ``lr_steps`` (Adam's rate of the log-steps, with ``learn_steps``).
    network_lr_steps: float = 1e-4
    #: Seeds the batches and the QDrop masks.
    seed: int = 0
    #: Fraction of the iterations before the rounding regularizer starts (the rounding learns freely).
    warmup: float = 0.2
    #: The regularizer's exponent, annealed linearly from ``beta_start`` to ``beta_end`` after the warmup.
    beta_start: float = 20.0
    beta_end: float = 2.0
    #: Weight of the rounding regularizer (per weight, against the output error relative to the target's mean square).
    rounding_weight: float = 0.01

    def __post_init__(self):
        check_fields(self, what="reconstruction")  # named as the recipe slot the user writes
        self.check()

    def check(self) -> None:
        for name in ("iterations", "batch_size", "images"):
            if getattr(self, name) < 1:
                raise UserError(f"reconstruction.{name} must be at least 1, got {getattr(self, name)}")
        if self.network_iterations < 0:
            raise UserError(f"reconstruction.network_iterations must be at least 0, got {self.network_iterations}")
        for name in ("lr_rounding", "lr_steps", "lr_bias", "network_lr_rounding", "network_lr_steps", "beta_end"):
            if getattr(self, name) <= 0:
                raise UserError(f"reconstruction.{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.qdrop < 1:
            raise UserError(f"reconstruction.qdrop must be a probability in [0, 1), got {self.qdrop}")
        if not 0 <= self.warmup < 1:
            raise UserError(f"reconstruction.warmup must be a fraction in [0, 1), got {self.warmup}")
        if self.beta_start < self.beta_end:
            raise UserError(f"reconstruction needs beta_start >= beta_end, got {self.beta_start} < {self.beta_end}")
        if self.rounding_weight < 0:
            raise UserError(f"reconstruction.rounding_weight must be at least 0, got {self.rounding_weight}")
        if self.learn_weight_steps and not (self.learn_rounding and self.rounding == "sign"):
            raise UserError("reconstruction.learn_weight_steps learns the weight steps with the rounding: it needs "
                            f"learn_rounding=True and rounding='sign' (got learn_rounding={self.learn_rounding}, "
                            f"rounding={self.rounding!r})")
        if self.fisher and self.last_unit == "features":
            raise UserError("reconstruction.last_unit='features' and fisher=True are two ways to count the last "
                            "unit's error (the Fisher weights its whole output): set one of them")
        if self.network_iterations and self.network_rounding and self.learn_rounding and self.rounding != "sign":
            raise UserError("reconstruction.network_rounding goes on learning a sign rounding, but rounding="
                            f"{self.rounding!r}: set network_rounding=False (the network stage then learns steps "
                            "and biases only) or rounding='sign'")
        for names, read, when, enable in _READ_ONLY_WHEN:
            if not read(self):
                for name in names:
                    if getattr(self, name) != _DEFAULTS[name]:
                        raise UserError(f"reconstruction.{name} is read only {when}, which this reconstruction does "
                                        f"not do (got {name}={getattr(self, name)!r}): drop it or {enable}")

    def with_changes(self, **changes) -> "Reconstruction":
        """These options with ``changes``, every setting the result would not read put back to its default
        (a later stage that learns less than the units reads fewer of the settings, and is refused none)."""
        probe = copy.copy(self)
        for name, value in changes.items():
            object.__setattr__(probe, name, value)  # the probe only answers which settings are read
        unread = {name: _DEFAULTS[name] for names, read, _, _ in _READ_ONLY_WHEN if not read(probe) for name in names}
        return replace(self, **{**changes, **unread})

    def network_learns_rounding(self) -> bool:
        """Whether the network stage runs and goes on learning the rounding the units learned."""
        return bool(self.network_iterations) and self.network_rounding and self.learn_rounding

    def learns_rounding(self) -> bool:
        """Whether the weights' rounding is learned (calibration then keeps where it starts: GPTQ's unrounded weight)."""
        return self.learn_rounding

    def beta(self, iteration: int) -> Optional[float]:
        """The regularizer's exponent at ``iteration`` (0-based), None during the warmup."""
        start = int(self.warmup * self.iterations)
        if iteration < start:
            return None
        progress = (iteration - start) / max(1, self.iterations - start)
        return self.beta_end + (self.beta_start - self.beta_end) * (1.0 - progress)


#: Settings read only under a condition: (fields, whether this reconstruction reads them, the condition, what
#: turns it on), so that a setting nothing would read is refused instead of silently unused.
_READ_ONLY_WHEN = (
    (("warmup", "beta_start", "beta_end", "rounding_weight"), lambda r: r.learn_rounding and r.rounding == "adaround",
     "with rounding='adaround'", "set learn_rounding=True and rounding='adaround'"),
    (("rounding", "lr_rounding"), lambda r: r.learn_rounding, "with learn_rounding=True", "set learn_rounding=True"),
    (("lr_steps",), lambda r: r.learn_steps or r.learn_weight_steps, "with learn_steps or learn_weight_steps",
     "set learn_steps=True"),
    (("learn_twin_log",), lambda r: r.learn_steps, "with learn_steps=True", "set learn_steps=True"),
    (("lr_bias",), lambda r: r.learn_bias, "with learn_bias=True", "set learn_bias=True"),
    (("network_rounding",), lambda r: r.network_iterations > 0 and r.learn_rounding,
     "with network_iterations > 0 and learn_rounding=True", "set network_iterations"),
    (("network_lr_rounding",), lambda r: r.network_learns_rounding(),
     "with network_iterations > 0, learn_rounding=True and network_rounding=True", "set network_iterations"),
    (("network_lr_steps",), lambda r: r.network_iterations > 0 and (
        r.learn_steps or (r.learn_weight_steps and r.network_learns_rounding())),
     "with network_iterations > 0 and steps learned", "set network_iterations"),
)
_DEFAULTS = {f.name: f.default for f in fields(Reconstruction)}

ReconstructionChoice = Union[NoReconstruction, Reconstruction]

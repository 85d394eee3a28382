"""Function-preserving transforms a recipe applies around calibration, in the order they apply."""
from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal, Union

from ..errors import UserError
from .component import Component

RotationKind = Literal["hadamard", "orthogonal"]
ROTATION_KINDS = typing.get_args(RotationKind)


@dataclass(frozen=True)
class Rotation(Component):
    """Orthogonal rotations folded into the weights (docs/lowbit.md §2): the residual stream
    (LayerNorm/LayerScale folded), per-head q/k/v, and fc2's input (online). ``kind``:
    randomized Hadamard ⊗ small random orthogonal, or dense random orthogonal."""
    variant = "rotation"
    kind: RotationKind = "hadamard"
    seed: int = 0
    residual: bool = True
    heads: bool = True
    fc2: bool = True

    def check(self) -> None:
        if not (self.residual or self.heads or self.fc2):
            raise UserError("rotation rotates nothing: set one of residual, heads, fc2 (or leave the transform out)")

    def flat_fields(self) -> dict:
        return {"rotate_residual": self.residual, "rotate_heads": self.heads, "rotate_fc2": self.fc2,
                "rotation_kind": self.kind, "rotation_seed": self.seed}


@dataclass(frozen=True)
class Smoothing(Component):
    """SmoothQuant migration of strength ``alpha`` for the inputs of qkv, fc1 and (uniform post-GELU
    input) fc2: ``x / s``, ``W diag(s)``, ``s_j = max|x_j|^α / max|W_:j|^(1-α)`` (docs/deployment.md)."""
    variant = "smoothing"
    alpha: float = 0.5

    def check(self) -> None:
        if not 0 < self.alpha <= 1:
            raise UserError(f"smoothing.alpha must be in (0, 1], got {self.alpha}")

    def flat_fields(self) -> dict:
        return {"smooth_alpha": self.alpha}


@dataclass(frozen=True)
class LayerNormReparam(Component):
    """RepQ-ViT's reparameterization (docs/lowbit.md §6): per-channel ranges of the post-LayerNorm
    inputs folded into the LayerNorm and qkv/fc1. ``round_zero_point``: round the per-tensor zero
    point the fold leaves; ``fold_float64``: compute the fold in float64 (else op for op as released)."""
    variant = "ln_reparam"
    round_zero_point: bool = False
    fold_float64: bool = False

    def flat_fields(self) -> dict:
        return {"reparam_ln": True, "reparam_round_zero_point": self.round_zero_point,
                "reparam_fold_float64": self.fold_float64}


@dataclass(frozen=True)
class BiasCorrection(Component):
    """Each linear layer's bias shifted by the mean output error its quantization causes on the
    calibration inputs (docs/deployment.md)."""
    variant = "bias_correction"

    def flat_fields(self) -> dict:
        return {"bias_correction": True}


Transform = Union[Rotation, Smoothing, LayerNormReparam, BiasCorrection]
#: The order transforms apply in; a recipe keeps its transforms in this order.
TRANSFORM_ORDER = tuple(t.variant for t in typing.get_args(Transform))

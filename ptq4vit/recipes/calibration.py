"""How scales are chosen: PTQ4ViT's grid search (docs/method.md §2) or RepQ-ViT's percentile ranges."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

from ..errors import UserError
from .component import Component

GradSource = Literal["kl-official", "ce-fp-label"]


class Scoring(Component):
    """What every metric answers for the capture passes: the gradients it scores with, if any."""

    def gradient_source(self) -> "GradSource | None":
        """Where ``g = dL/dO`` comes from; None: the metric needs no gradients."""
        return None

    def gradient_chunk(self) -> int:
        """Images per backward pass where the gradients need the whole batch's targets (``kl-official``)."""
        return 4


@dataclass(frozen=True)
class Hessian(Scoring):
    """Score a candidate by the hessian-weighted output error, ``g = dL/dO`` from ``gradients``
    (docs/method.md §5); ``grad_chunk`` images per backward pass for ``kl-official`` gradients."""
    variant = "hessian"
    gradients: GradSource = "ce-fp-label"
    grad_chunk: int = 4

    def check(self) -> None:
        if self.grad_chunk < 1:
            raise UserError(f"hessian.grad_chunk must be at least 1, got {self.grad_chunk}")
        if self.grad_chunk != 4 and self.gradients != "kl-official":
            raise UserError(f"hessian.grad_chunk applies to kl-official gradients only (these are {self.gradients}): "
                            f"setting it to {self.grad_chunk} changes nothing")

    def gradient_source(self) -> GradSource:
        return self.gradients

    def flat_fields(self) -> dict:
        return {"grad_source": self.gradients, "grad_chunk": self.grad_chunk}

    def gradient_chunk(self) -> int:
        return self.grad_chunk


@dataclass(frozen=True)
class Cosine(Scoring):
    """Score a candidate by the cosine similarity of the quantized and float outputs."""
    variant = "cosine"


@dataclass(frozen=True)
class MSE(Scoring):
    """Score a candidate by the mean squared output error."""
    variant = "mse"


Metric = Union[Hessian, Cosine, MSE]


class Calibrating(Component):
    """What every calibration answers for the engine; the grid search's metric decides the gradients."""

    def gradient_source(self) -> "GradSource | None":
        """Where calibration's ``g = dL/dO`` comes from; None when it needs no gradients."""
        return None

    def gradient_chunk(self) -> int:
        """Images per backward pass for ``kl-official`` gradients."""
        return 4


@dataclass(frozen=True)
class GridSearch(Calibrating):
    """Symmetric quantizers, each scale the best of the grid ``Δ0 · (α + i(β-α)/n)``, i = 0..n-1,
    under ``metric``; weights and inputs searched in alternating ``rounds`` (stops early once a
    round changes nothing); candidates scored on ``search_rows`` evenly spaced rows of each
    activation (0: all), ranges always from every row."""
    variant = "grid_search"
    metric: Metric = field(default_factory=Hessian)
    alpha: float = 0.01
    beta: float = 1.2
    n_candidates: int = 100
    rounds: int = 3
    search_rows: int = 0

    def check(self) -> None:
        if not 0 < self.alpha < self.beta:
            raise UserError(f"grid_search needs 0 < alpha < beta, got alpha={self.alpha}, beta={self.beta}")
        for name in ("n_candidates", "rounds"):
            if getattr(self, name) < 1:
                raise UserError(f"grid_search.{name} must be at least 1, got {getattr(self, name)}")
        if self.search_rows < 0:
            raise UserError(f"grid_search.search_rows must be 0 (all rows) or positive, got {self.search_rows}")

    def gradient_source(self) -> "GradSource | None":
        return self.metric.gradient_source()

    def gradient_chunk(self) -> int:
        return self.metric.gradient_chunk()

    def flat_fields(self) -> dict:
        return {"metric": self.metric.variant, "alpha": self.alpha, "beta": self.beta,
                "n_candidates": self.n_candidates, "rounds": self.rounds, "search_rows": self.search_rows,
                **self.metric.flat_fields()}


@dataclass(frozen=True)
class Percentile(Calibrating):
    """RepQ-ViT's calibration (docs/lowbit.md §6): asymmetric (zero-point) quantizers everywhere,
    per-channel weights, each range the best of three percentile pairs by MSE, activations
    calibrated in forward order on the outputs of the already quantized layers."""
    variant = "percentile"

    def flat_fields(self) -> dict:
        return {"calibration": "percentile"}


Calibration = Union[GridSearch, Percentile]

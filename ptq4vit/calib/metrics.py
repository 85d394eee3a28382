"""Scores of candidate outputs against the float output (SPEC §2): higher is better."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def row_scores(out_hat: torch.Tensor, out: torch.Tensor, grad: Optional[torch.Tensor], metric: str, dim: int = -1) -> torch.Tensor:
    """Reduce the metric over ``dim`` (the feature dim), one score per remaining position.

    * ``cosine``: cosine similarity of ``out_hat`` and ``out``;
    * ``mse``: ``-mean((out - out_hat)^2)``;
    * ``hessian``: ``-mean((g * (out - out_hat))^2)``, the diagonal Gauss-Newton
      approximation of the task-loss change.

    ``out`` and ``grad`` broadcast against ``out_hat``; ``out_hat`` is overwritten.
    """
    if metric == "cosine":
        return F.cosine_similarity(out_hat, out, dim=dim)
    err = out_hat.sub_(out)
    if metric == "hessian":
        if grad is None:
            raise ValueError("the hessian metric needs output gradients")
        err.mul_(grad)
    elif metric != "mse":
        raise ValueError(f"unknown metric {metric!r}")
    return err.square_().mean(dim).neg_()

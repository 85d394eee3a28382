"""Scores of candidate outputs against the float output (docs/method.md §2), reduced along one dim.

Higher is better. Both functions overwrite their first argument (they run inside the search's
inner loop, where a copy would cost a full pass over the candidates' outputs).
"""
from __future__ import annotations

import torch

#: As in ``torch.nn.functional.cosine_similarity``.
COSINE_EPS = 1e-8


def neg_mean_square_(err: torch.Tensor, dim: int) -> torch.Tensor:
    """``-mean(err²)`` along ``dim``: the ``mse`` metric, or ``hessian`` when ``err`` is ``g ⊙ (Ô - O)``."""
    return torch.linalg.vector_norm(err, dim=dim).square_().div_(err.shape[dim]).neg_()


def cosine_(out_hat: torch.Tensor, out: torch.Tensor, dim: int) -> torch.Tensor:
    """Cosine similarity of ``out_hat`` and ``out`` along ``dim``, as ``F.cosine_similarity`` defines it."""
    out_sq = out.square().sum(dim)
    hat_sq = torch.linalg.vector_norm(out_hat, dim=dim).square_()
    dot = out_hat.mul_(out).sum(dim)
    return dot.div_(torch.sqrt(torch.clamp_min(hat_sq.mul_(out_sq), COSINE_EPS ** 2)))

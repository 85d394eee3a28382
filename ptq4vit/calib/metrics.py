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
    """Cosine similarity of ``out_hat`` and ``out`` along ``dim``, computed op for op as
    ``F.cosine_similarity(out, out_hat, dim)`` computes it: each vector divided by its norm
    (clamped at ``COSINE_EPS``), the quotients multiplied and summed. The same float32 values as
    the released code's scores when ``dim`` is contiguous in both (the sums then run in the
    order of an inner reduction, as there), which keeps near-ties between candidates decided as
    the released code decides them.
    """
    out_norm = torch.linalg.vector_norm(out, dim=dim, keepdim=True).clamp_min_(COSINE_EPS)
    hat_norm = torch.linalg.vector_norm(out_hat, dim=dim, keepdim=True).clamp_min_(COSINE_EPS)
    return out_hat.div_(hat_norm).mul_(out / out_norm).sum(dim)

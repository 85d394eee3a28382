"""Batched scale search: score many candidate scales of one operand per tensor operation.

Every quantization site computes a product ``O = A @ B (+ bias)``: a linear layer is
``X @ Wᵀ``, a patch-embedding conv is ``patches @ Wᵀ``, an attention matmul is itself. To
score ``c`` candidate scales of one operand at once, the candidates' quantized copies are
stacked next to the rows (for A) or the columns (for B) so that a single matmul yields all
``c`` candidate outputs. Work is split into chunks of candidates and rows whose temporaries
fit ``budget_bytes``; the scores are summed in float64 so the chunking does not move them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .metrics import row_scores

#: ``quant(x, scale) -> fake-quantized x``; ``scale`` broadcasts a candidate dim into ``x``.
QuantFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Product:
    """The float operands of one site's product and what scoring needs of its output."""

    a: torch.Tensor                      # (*batch, M, K)
    b: torch.Tensor                      # (*batch, K, N), or (K, N) shared by the batch
    bias: Optional[torch.Tensor] = None  # (N,)
    grad: Optional[torch.Tensor] = None  # dL/dO, (*batch, M, N); needed by the hessian metric
    metric: str = "cosine"
    #: Batch dim whose index is a quantization group (the head dim of attention operands).
    head_axis: Optional[int] = None

    def __post_init__(self):
        self._out: Optional[torch.Tensor] = None

    @property
    def out(self) -> torch.Tensor:
        """The float output, computed once with the same kernels as the candidates."""
        if self._out is None:
            self._out = self.matmul(self.a, self.b)
        return self._out

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = a @ b
        return out.add_(self.bias) if self.bias is not None else out


def _batch_numel(t: torch.Tensor) -> int:
    return math.prod(t.shape[:-2])


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _reduce(r: torch.Tensor, cand_dim: int, head_axis: Optional[int]) -> torch.Tensor:
    """Sum per-row scores ``r`` over everything but candidates, heads and feature groups -> (c, G)."""
    keep = {cand_dim % r.dim(), r.dim() - 1}
    if head_axis is not None:
        keep.add(head_axis)
    summed = r.double().sum(dim=[d for d in range(r.dim()) if d not in keep])
    if head_axis is not None:  # (heads, c, G) -> (c, heads * G)
        summed = summed.transpose(0, 1)
    return summed.reshape(summed.shape[0], -1)


def score_a(p: Product, b_fixed: torch.Tensor, quant: QuantFn, cands: torch.Tensor, budget_bytes: int,
            feature_groups: int = 1) -> torch.Tensor:
    """Scores ``(n, G)`` of candidate scales for operand A with B fixed at ``b_fixed``.

    ``cands`` is ``(n, *s)`` with ``s`` broadcasting against A's batch dims (``()`` for one
    scale, ``(1, heads)`` for one per head).
    """
    n = cands.shape[0]
    batch = p.a.shape[:-2]
    M, K = p.a.shape[-2:]
    N = p.b.shape[-1]
    nb = _batch_numel(p.a)
    per_cand_row = nb * (K + 3 * N)
    c = max(1, min(n, budget_bytes // 4 // (per_cand_row * M)))
    mc = M if c > 1 else max(1, min(M, budget_bytes // 4 // per_cand_row))
    out, grad = p.out, p.grad
    scores = []
    for c0, c1 in _chunks(n, c):
        scale = cands[c0:c1].movedim(0, -1)[..., None, None]
        total = 0
        for m0, m1 in _chunks(M, mc):
            a_stack = quant(p.a[..., m0:m1, :].unsqueeze(-3), scale)            # (*batch, c, m, K)
            out_hat = p.matmul(a_stack.flatten(-3, -2), b_fixed)                  # (*batch, c*m, N)
            out_hat = out_hat.unflatten(-2, (c1 - c0, m1 - m0))
            o = out[..., m0:m1, :].unsqueeze(-3)
            g = grad[..., m0:m1, :].unsqueeze(-3) if grad is not None else None
            r = _grouped_row_scores(out_hat, o, g, p.metric, feature_groups)
            total = total + _reduce(r, len(batch), p.head_axis)
        scores.append(total)
    return torch.cat(scores)


def score_b(p: Product, a_fixed: torch.Tensor, quant: QuantFn, cands: torch.Tensor, budget_bytes: int,
            feature_groups: int = 1, rows_are_features: bool = False) -> torch.Tensor:
    """Scores ``(n, G)`` of candidate scales for operand B with A fixed at ``a_fixed``.

    ``cands`` is ``(n, *s, t)`` with ``s`` broadcasting against B's batch dims and ``t`` either
    1 or N (a scale per output column, used for grouped weights). ``feature_groups`` splits
    the N columns into blocks scored separately. ``rows_are_features`` scores each output
    column over the rows of each batch entry instead (a conv channel over its positions).
    """
    n = cands.shape[0]
    batch = p.a.shape[:-2]
    M, K = p.a.shape[-2:]
    N = p.b.shape[-1]
    nb = _batch_numel(p.a)
    stack_per_cand = _batch_numel(p.b) * K * N
    per_cand_row = nb * 3 * N
    budget = budget_bytes // 4
    c = max(1, min(n, budget // (per_cand_row * M + stack_per_cand)))
    mc = M
    if c == 1 and not rows_are_features:
        mc = max(1, min(M, (budget - stack_per_cand) // per_cand_row))
    out, grad = p.out, p.grad
    scores = []
    for c0, c1 in _chunks(n, c):
        scale = cands[c0:c1].movedim(0, -2).unsqueeze(-3)
        b_stack = quant(p.b.unsqueeze(-2), scale).flatten(-2)                     # (*batch, K, c*N)
        total = 0
        for m0, m1 in _chunks(M, mc):
            out_hat = (a_fixed[..., m0:m1, :] @ b_stack).unflatten(-1, (c1 - c0, N))  # (*batch, m, c, N)
            if p.bias is not None:
                out_hat.add_(p.bias)
            o = out[..., m0:m1, :].unsqueeze(-2)
            g = grad[..., m0:m1, :].unsqueeze(-2) if grad is not None else None
            if rows_are_features:
                r = row_scores(out_hat, o, g, p.metric, dim=-3)                        # (*batch, c, N)
                total = total + _reduce(r, len(batch), p.head_axis)
            else:
                r = _grouped_row_scores(out_hat, o, g, p.metric, feature_groups)
                total = total + _reduce(r, len(batch) + 1, p.head_axis)
        scores.append(total)
    return torch.cat(scores)


def _grouped_row_scores(out_hat, out, grad, metric, groups):
    if groups > 1:
        out_hat = out_hat.unflatten(-1, (groups, -1))
        out = out.unflatten(-1, (groups, -1))
        grad = grad.unflatten(-1, (groups, -1)) if grad is not None else None
    else:
        out_hat, out = out_hat.unsqueeze(-2), out.unsqueeze(-2)
        grad = grad.unsqueeze(-2) if grad is not None else None
    return row_scores(out_hat, out, grad, metric)


def best(scores: torch.Tensor) -> torch.Tensor:
    """Index of the best candidate per group (first on ties)."""
    return scores.argmax(dim=0)

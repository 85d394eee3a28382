"""Batched scale search: score many candidate scales of one operand per tensor operation.

Every quantization site computes a product ``O = A @ B (+ bias)``: a linear layer is
``X @ Wᵀ``, the patch-embedding conv is ``patches @ Wᵀ``, an attention matmul is itself
(batched over images x heads). A :class:`Product` holds it in one canonical 3-d form,
``A: (Bt, M, K)``, ``B: (Bt or 1, K, N)``, ``Bt`` = images x heads (1 for a linear layer).

The quantized copies of the searched operand for ``c`` candidates are built in one
broadcast op and multiplied in one batched GEMM that also subtracts the float output
(``baddbmm(O, A, B, beta=-1)``), so the error ``Ô - O`` never needs a pass of its own. Rows
and candidates are split into steps whose temporaries stay within a small working set
(cache-friendly) and within the caller's byte budget; per-row scores are summed in float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

#: Upper bound on one search step's temporaries. Small steps keep the metric's passes in
#: cache: on a 2-core CPU, 16-64 MiB steps score 2-4x faster than 1 GiB ones.
SEARCH_CHUNK_BYTES = 64 << 20

#: ``quant(x, scale) -> fake-quantized x``; ``scale`` carries a candidate dim into ``x``.
QuantFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_COSINE_EPS = 1e-8


@dataclass
class Product:
    """The float operands of one site's product and what scoring needs of its output."""

    a: torch.Tensor                      # (Bt, M, K)
    b: torch.Tensor                      # (Bt, K, N), or (1, K, N) shared by every batch entry
    bias: Optional[torch.Tensor] = None  # (N,)
    grad: Optional[torch.Tensor] = None  # dL/dO, (Bt, M, N); needed by the hessian metric
    metric: str = "cosine"
    #: Bt = images x heads with the head index fastest; scales and scores may be per head.
    heads: int = 1

    def __post_init__(self):
        if self.a.dim() != 3 or self.b.dim() != 3:
            raise ValueError("Product operands must be 3-d: A (Bt, M, K), B (Bt or 1, K, N)")
        if self.metric not in ("cosine", "mse", "hessian"):
            raise ValueError(f"unknown metric {self.metric!r}")
        if self.metric == "hessian" and self.grad is None:
            raise ValueError("the hessian metric needs output gradients")
        out = self.a @ self.b
        if self.bias is not None:
            out = out + self.bias
        self.out = out
        # What baddbmm subtracts: A @ B - (O - bias) = Ô - O.
        self._target = out - self.bias if self.bias is not None else out


def _blocks(p: Product, per_row_elems: int, budget_elems: int, n: int, align_rows: int):
    """Yield (candidate count per step, [(bt0, bt1, m0, m1), ...]) for the step sizes."""
    bt, m = p.a.shape[0], p.a.shape[1]
    if bt == 1:
        c = max(1, min(n, budget_elems // max(1, m * per_row_elems)))
        if c < min(n, 8):  # rather fewer rows than fewer candidates per step
            c = min(n, 8)
        rows = max(align_rows, (budget_elems // (c * per_row_elems)) // align_rows * align_rows)
        return c, [(0, 1, m0, min(m, m0 + rows)) for m0 in range(0, m, rows)]
    # Batched products (attention): one candidate per step, whole head groups per block.
    per_group = p.heads * m * per_row_elems
    groups = max(1, budget_elems // per_group)
    step = groups * p.heads
    return 1, [(b0, min(bt, b0 + step), 0, m) for b0 in range(0, bt, step)]


def _scale_for(cands: torch.Tensor, bt0: int, bt1: int, heads: int, side: str) -> torch.Tensor:
    """Candidate scales ``(c, S)`` shaped to broadcast against the stacked operand.

    S = 1 (one scale), ``heads`` (per head, mapped onto batch entries) or N (per output column).
    A stack is ``(c, bt, m, K)``; B stack is ``(c, bt, K, N)``.
    """
    c, s = cands.shape
    if s == 1:
        return cands.reshape(c, 1, 1, 1)
    if s == heads and heads > 1:
        head_of = torch.arange(bt0, bt1, device=cands.device) % heads
        return cands[:, head_of].reshape(c, bt1 - bt0, 1, 1)
    if side == "b":
        return cands.reshape(c, 1, 1, s)
    raise ValueError(f"cannot lay out {s} scales per candidate on operand {side}")


def _row_scores(err_or_out: torch.Tensor, p: Product, blk, metric: str, groups: int, rows_per_item: int) -> torch.Tensor:
    """Per-row scores ``(c, bt, rows, G)``, or ``(c, bt, items, N)`` when rows are the features."""
    bt0, bt1, m0, m1 = blk
    x = err_or_out
    if metric == "hessian":
        x.mul_(p.grad[bt0:bt1, m0:m1])
    if rows_per_item:
        # A conv channel is scored over the positions of each image: features = rows.
        x = x.unflatten(2, (-1, rows_per_item))
        dim = -2
    else:
        x = x.unflatten(-1, (groups, -1))
        dim = -1
    if metric != "cosine":
        return torch.linalg.vector_norm(x, dim=dim).square_().div_(x.shape[dim]).neg_()
    o = p.out[bt0:bt1, m0:m1]
    o = o.unflatten(1, (-1, rows_per_item)) if rows_per_item else o.unflatten(-1, (groups, -1))
    o_sq = o.square().sum(dim)
    x_sq = torch.linalg.vector_norm(x, dim=dim).square_()
    dot = x.mul_(o).sum(dim)
    return dot.div_(torch.sqrt(torch.clamp_min(x_sq.mul_(o_sq), _COSINE_EPS ** 2)))


def _reduce(r: torch.Tensor, heads: int, per_head: bool) -> torch.Tensor:
    """``(c, bt, rows, G)`` -> ``(c, G')``: sum rows and images, keep heads if per_head."""
    r = r.double().sum(dim=2)                   # (c, bt, G)
    if per_head:
        return r.unflatten(1, (-1, heads)).sum(dim=1).flatten(1)
    return r.sum(dim=1)


def score(p: Product, side: str, fixed: torch.Tensor, quant: QuantFn, cands: torch.Tensor, budget_bytes: int,
          feature_groups: int = 1, per_head: bool = False, rows_per_item: int = 0) -> torch.Tensor:
    """Scores ``(n, G)`` (higher is better) of candidate scales of operand ``side`` (``"a"`` or ``"b"``).

    Args:
        fixed: the other operand as it is held fixed (already fake-quantized, or float).
        quant: fake quantization of the searched operand.
        cands: ``(n, S)`` candidate scales, S = 1, ``p.heads`` or N (per output column, B only).
        feature_groups: N is split into this many blocks, each scored on its own columns
            (the q/k/v blocks of a fused qkv weight).
        per_head: keep one score per head (G = heads) instead of summing heads.
        rows_per_item: score each output column over consecutive runs of this many rows
            (a conv output channel over the positions of one image); 0 for the feature dim.
    """
    n = cands.shape[0]
    K, N = p.a.shape[2], p.b.shape[2]
    per_row = N * (3 if p.metric == "cosine" else 2) + (K if side == "a" else 0)
    budget = max(1, budget_bytes // 4)
    c, blocks = _blocks(p, per_row, budget, n, max(1, rows_per_item))
    if side == "b" and p.b.shape[0] == 1 and c * K * N > budget:  # the weight stack dominates
        c = max(1, budget // (K * N))
    total = []
    for c0 in range(0, n, c):
        chunk = cands[c0:c0 + c]
        cc = chunk.shape[0]
        stack_b = None
        if side == "b" and p.b.shape[0] == 1:
            stack_b = quant(p.b.unsqueeze(0), _scale_for(chunk, 0, 1, p.heads, "b")).flatten(0, 1)  # (c, K, N)
        acc = 0
        for blk in blocks:
            bt0, bt1, m0, m1 = blk
            bt, m = bt1 - bt0, m1 - m0
            assert cc == 1 or bt == 1, "batched products are scored one candidate per step"
            if side == "a":
                stack = quant(p.a[bt0:bt1, m0:m1].unsqueeze(0), _scale_for(chunk, bt0, bt1, p.heads, "a"))  # (c, bt, m, K)
                b_fix = fixed[bt0:bt1] if fixed.shape[0] > 1 else fixed
                lhs, rhs = stack.flatten(0, 1), b_fix.expand(max(bt, cc), K, N)
            elif stack_b is not None:
                lhs, rhs = fixed[bt0:bt1, m0:m1].expand(cc, m, K), stack_b
            else:
                stack = quant(p.b[bt0:bt1].unsqueeze(0), _scale_for(chunk, bt0, bt1, p.heads, "b"))  # (c, bt, K, N)
                lhs, rhs = fixed[bt0:bt1, m0:m1], stack.flatten(0, 1)
            if p.metric == "cosine":
                res = torch.bmm(lhs, rhs)
                if p.bias is not None:
                    res.add_(p.bias)
            else:
                res = torch.baddbmm(p._target[bt0:bt1, m0:m1], lhs, rhs, beta=-1)
            res = res.unflatten(0, (cc, bt))                                    # (c, bt, m, N)
            r = _row_scores(res, p, blk, p.metric, feature_groups, rows_per_item)
            acc = acc + _reduce(r, p.heads, per_head)
        total.append(acc)
    return torch.cat(total)


def best(scores: torch.Tensor) -> torch.Tensor:
    """Index of the best candidate per group (first on ties)."""
    return scores.argmax(dim=0)

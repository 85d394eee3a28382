"""Batched scale search: score many candidate scales of one operand per tensor operation.

Every quantization site computes a product ``O = A @ B (+ bias)``: a linear layer is
``X @ Wᵀ``, the patch-embedding conv is ``patches @ Wᵀ``, an attention matmul is itself
(batched over images, or images x heads). A :class:`Product` holds one quantization group's
product in a canonical 3-d form, ``A: (Bt, M, K)``, ``B: (Bt or 1, K, N)``; the caller splits
grouped scales (q/k/v blocks, heads) into one product per group.

The quantized copies of the searched operand for ``c`` candidates are built in one broadcast
op and multiplied in one batched GEMM that also subtracts the float output
(``baddbmm(O, A, B, beta=-1)``), so the error ``Ô - O`` costs no pass of its own. Work is cut
into blocks of rows (or batch entries) whose temporaries stay within a small, cache-friendly
working set bounded by the caller's byte budget; per-row scores are summed in float64 (or returned
unreduced by :func:`row_scores`, for a caller that reduces them in an order of its own).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .metrics import cosine_, neg_mean_square_

#: Upper bound on one search step's temporaries. Small steps keep the metric's passes in
#: cache: on a 2-core CPU, 16-64 MiB steps score 2-4x faster than 1 GiB ones.
SEARCH_CHUNK_BYTES = 64 << 20

#: Blocks a pruned search cuts its rows into: finer blocks drop hopeless candidates sooner.
PRUNE_BLOCKS = 8

#: ``quant(x, scale) -> fake-quantized x``; ``scale`` carries a leading candidate dim into ``x``.
QuantFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

@dataclass
class Product:
    """The float operands of one group's product and what scoring needs of its output."""

    a: torch.Tensor                      # (Bt, M, K)
    b: torch.Tensor                      # (Bt, K, N), or (1, K, N) shared by every batch entry
    bias: Optional[torch.Tensor] = None  # (N,)
    grad: Optional[torch.Tensor] = None  # dL/dO, (Bt, M, N); needed by the hessian metric
    metric: str = "cosine"

    def __post_init__(self):
        if self.a.dim() != 3 or self.b.dim() != 3:
            raise ValueError("Product operands must be 3-d: A (Bt, M, K), B (Bt or 1, K, N)")
        if self.metric not in ("cosine", "mse", "hessian"):
            raise ValueError(f"unknown metric {self.metric!r}")
        if self.metric == "hessian" and self.grad is None:
            raise ValueError("the hessian metric needs output gradients")
        # Only what the metric reads is kept, one output-sized tensor: cosine
        # compares against O = A @ B + bias, the error metrics subtract A @ B (the candidates'
        # products lack the bias too, so Ô - O needs no bias).
        out = self.a @ self.b
        if self.metric == "cosine":
            self.out, self._target = (out.add_(self.bias) if self.bias is not None else out), None
        else:
            self.out, self._target = None, out

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(Bt, M, K, N)."""
        return (*self.a.shape, self.b.shape[2])


Block = tuple[int, int, int, int]  # bt0, bt1, m0, m1


def _plan(p: Product, side: str, n: int, budget_bytes: int, rows_per_item: int, min_blocks: int = 1):
    """Candidates per step and the blocks of (batch entries, rows) each step covers."""
    bt, m, K, N = p.shape
    per_row = N * (3 if p.metric == "cosine" else 2) + (K if side == "a" else 0)
    budget = max(1, budget_bytes // 4)
    align = max(1, rows_per_item)
    if bt == 1:
        c = min(n, max(8, budget // max(1, m * per_row)))
        rows = max(align, min(budget // (c * per_row), -(-m // min_blocks)) // align * align)
        if side == "b" and c * K * N > budget:  # the weight stack dominates
            c = max(1, budget // (K * N))
        return c, [(0, 1, m0, min(m, m0 + rows)) for m0 in range(0, m, rows)]
    # Batched products (attention): whole batch entries per block, as many candidates as fit.
    per_item = m * per_row
    step = max(1, min(budget // per_item, -(-bt // min_blocks)))
    c = max(1, min(n, budget // (step * per_item)))
    return c, [(b0, min(bt, b0 + step), 0, m) for b0 in range(0, bt, step)]


def _weight_stack(p: Product, quant: QuantFn, chunk: torch.Tensor) -> torch.Tensor:
    """Quantized copies of a shared B for the candidates ``chunk``, side by side: ``(K, c*N)``."""
    _, _, K, N = p.shape
    return quant(p.b[0].unsqueeze(1), chunk.reshape(1, chunk.shape[0], -1)).reshape(K, -1)


def _row_scores(x: torch.Tensor, p: Product, blk: Block, rows_per_item: int) -> torch.Tensor:
    """Per-row scores of the candidates' errors (or outputs, for cosine) ``x: (c, bt, m, N)``.

    Returns ``(c, bt, m)``, or ``(c, bt, items, N)`` when rows are the features.
    """
    bt0, bt1, m0, m1 = blk
    if p.metric == "hessian":
        x.mul_(p.grad[bt0:bt1, m0:m1])
    # A conv channel is scored over the positions of each image: the features are rows.
    dim = -2 if rows_per_item else -1
    if rows_per_item:
        x = x.unflatten(2, (-1, rows_per_item))
    if p.metric != "cosine":
        return neg_mean_square_(x, dim)
    o = p.out[bt0:bt1, m0:m1]
    if rows_per_item:
        # Positions last and contiguous, as the released code lays a channel's outputs out: its
        # cosine sums them in that (inner-reduction) order.
        x = x.transpose(-1, -2).contiguous()
        o = o.unflatten(1, (-1, rows_per_item)).transpose(-1, -2).contiguous()
        dim = -1
    return cosine_(x, o, dim)


def _score_block(p: Product, side: str, fixed: torch.Tensor, quant: QuantFn, chunk: torch.Tensor, blk: Block,
                 rows_per_item: int = 0, stack_b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scores ``(c, G)`` of the candidates ``chunk`` over one block (G = 1, or N with rows_per_item)."""
    r = _block_rows(p, side, fixed, quant, chunk, blk, rows_per_item, stack_b).double()
    return r.sum(dim=(1, 2)).reshape(chunk.shape[0], -1)


def _block_rows(p: Product, side: str, fixed: torch.Tensor, quant: QuantFn, chunk: torch.Tensor, blk: Block,
                rows_per_item: int = 0, stack_b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-row float32 scores of the candidates ``chunk`` over one block: ``(c, bt, m)``, or
    ``(c, bt, items, N)`` with rows_per_item."""
    bt0, bt1, m0, m1 = blk
    bt, m = bt1 - bt0, m1 - m0
    cc = chunk.shape[0]
    _, _, K, N = p.shape
    if bt > 1 or p.b.shape[0] > 1:
        return _batched_block_rows(p, side, fixed, quant, chunk, blk)
    # One plain GEMM for all candidates: stacked next to the rows (A) or the columns (B).
    if side == "a":
        stack = quant(p.a[0, m0:m1].unsqueeze(0), chunk.reshape(cc, 1, 1))          # (c, m, K)
        res = torch.mm(stack.flatten(0, 1), fixed[0]).unflatten(0, (cc, m))        # (c, m, N)
    else:
        if stack_b is None:
            stack_b = _weight_stack(p, quant, chunk)                               # (K, c*N)
        res = torch.mm(fixed[0, m0:m1], stack_b).unflatten(1, (cc, N)).transpose(0, 1)  # (c, m, N) view
    if p.metric == "cosine":
        if p.bias is not None:
            res.add_(p.bias)
    else:
        res.sub_(p._target[0, m0:m1])
    return _row_scores(res.unsqueeze(1), p, blk, rows_per_item)


def _batched_block_rows(p: Product, side: str, fixed: torch.Tensor, quant: QuantFn, chunk: torch.Tensor,
                        blk: Block) -> torch.Tensor:
    """Per-row scores ``(c, bt, m)`` over a block of batch entries of a batched product (attention).

    Candidates are stacked next to the rows (A) or the columns (B) of each batch entry, so one
    batched GEMM over the block's entries yields every candidate's output.
    """
    bt0, bt1, m0, m1 = blk
    cc = chunk.shape[0]
    scale = chunk.reshape(cc)
    if side == "a":
        stack = quant(p.a[bt0:bt1].unsqueeze(1), scale.reshape(1, cc, 1, 1))       # (bt, c, m, K)
        b_fix = fixed[bt0:bt1] if fixed.shape[0] > 1 else fixed
        res = torch.matmul(stack.flatten(1, 2), b_fix).unflatten(1, (cc, -1))      # (bt, c, m, N)
        g = p.grad[bt0:bt1].unsqueeze(1) if p.grad is not None else None
    else:
        b_blk = p.b[bt0:bt1] if p.b.shape[0] > 1 else p.b
        stack = quant(b_blk.unsqueeze(2), scale.reshape(1, 1, cc, 1))              # (bt, K, c, N)
        res = torch.matmul(fixed[bt0:bt1], stack.flatten(2, 3)).unflatten(2, (cc, -1))  # (bt, m, c, N)
        g = p.grad[bt0:bt1].unsqueeze(2) if p.grad is not None else None
    cand_dim = 1 if side == "a" else 2
    if p.metric == "cosine":
        if p.bias is not None:
            res.add_(p.bias)
        r = cosine_(res, p.out[bt0:bt1].unsqueeze(cand_dim), -1)
    else:
        err = res.sub_(p._target[bt0:bt1].unsqueeze(cand_dim))
        if p.metric == "hessian":
            err.mul_(g)
        r = neg_mean_square_(err, -1)
    return r.movedim(cand_dim, 0)                                                   # (c, bt, m)


def score(p: Product, side: str, fixed: torch.Tensor, quant: QuantFn, cands: torch.Tensor, budget_bytes: int,
          rows_per_item: int = 0) -> torch.Tensor:
    """Scores ``(n, G)`` (higher is better) of candidate scales of operand ``side`` (``"a"`` or ``"b"``).

    Args:
        fixed: the other operand as it is held fixed (already fake-quantized, or float).
        quant: fake quantization of the searched operand.
        cands: ``(n, S)`` candidate scales; S = 1, or N (one per output column, operand B only).
        rows_per_item: score each output column separately over consecutive runs of this many
            rows (a conv output channel over the positions of one image), G = N; else G = 1
            and the metric reduces the feature dim.
    """
    n = cands.shape[0]
    c, blocks = _plan(p, side, n, budget_bytes, rows_per_item)
    total = []
    for c0 in range(0, n, c):
        chunk = cands[c0:c0 + c]
        stack_b = None
        if side == "b" and p.b.shape[0] == 1:  # the quantized weights serve every block
            stack_b = _weight_stack(p, quant, chunk)
        acc = 0
        for blk in blocks:
            acc = acc + _score_block(p, side, fixed, quant, chunk, blk, rows_per_item, stack_b)
        total.append(acc)
    return torch.cat(total)


def row_scores(p: Product, side: str, fixed: torch.Tensor, quant: QuantFn, cands: torch.Tensor, budget_bytes: int,
               rows_per_item: int = 0) -> torch.Tensor:
    """Every row's float32 score of every candidate, unreduced: ``(n, Bt, M)``, or
    ``(n, Bt, M // rows_per_item, N)`` with rows_per_item (arguments as :func:`score`).

    For callers that reduce the rows in an order of their own (the released code's, for cosine:
    :mod:`ptq4vit.calib.released_order`). Each row's score is computed alone, so it does not
    depend on how candidates and rows are cut into steps.
    """
    n = cands.shape[0]
    c, blocks = _plan(p, side, n, budget_bytes, rows_per_item)
    row_dim = 1 if blocks[0][1] - blocks[0][0] < p.shape[0] else 2  # blocks of batch entries, or of rows
    out = []
    for c0 in range(0, n, c):
        chunk = cands[c0:c0 + c]
        stack_b = _weight_stack(p, quant, chunk) if side == "b" and p.b.shape[0] == 1 else None
        out.append(torch.cat([_block_rows(p, side, fixed, quant, chunk, blk, rows_per_item, stack_b)
                              for blk in blocks], dim=row_dim))
    return torch.cat(out)


def best_pruned(p: Product, side: str, fixed: torch.Tensor, quant: QuantFn, cands: torch.Tensor,
                budget_bytes: int) -> int:
    """Index of the best candidate (first on ties), as ``score(...)``'s argmax but usually cheaper.

    For ``mse`` and ``hessian`` every row adds a score <= 0, so a candidate's partial sum over
    the blocks seen so far bounds its final score from above (float64 addition of non-positive
    terms never increases a sum). The leader after the first block is scored in full; a
    candidate whose partial sum falls strictly below that full score cannot win and is dropped.
    """
    if p.metric == "cosine":
        raise ValueError("pruning needs a metric whose row scores are <= 0 (mse, hessian)")
    n = cands.shape[0]
    c, blocks = _plan(p, side, n, budget_bytes, 0, min_blocks=PRUNE_BLOCKS)

    def run(idx: torch.Tensor, blk: Block) -> torch.Tensor:
        return torch.cat([_score_block(p, side, fixed, quant, cands[idx[i:i + c]], blk)[:, 0]
                          for i in range(0, len(idx), c)])

    everyone = torch.arange(n, device=cands.device)
    partial = run(everyone, blocks[0])
    leader = int(partial.argmax())
    leader_score = partial[leader].clone()
    for blk in blocks[1:]:
        leader_score += run(everyone[leader:leader + 1], blk)[0]
    alive = everyone[(partial >= leader_score) & (everyone != leader)]
    for blk in blocks[1:]:
        if alive.numel() == 0:
            break
        partial[alive] += run(alive, blk)
        alive = alive[partial[alive] >= leader_score]
    final = torch.full_like(partial, float("-inf"))
    final[alive] = partial[alive]
    final[leader] = leader_score
    return int(final.argmax())


def best_index(p: Product, side: str, fixed: torch.Tensor, quant: QuantFn, cands: torch.Tensor,
               budget_bytes: int) -> int:
    """The best candidate of a one-group search, pruned where the metric allows it."""
    if p.metric == "cosine":
        return int(score(p, side, fixed, quant, cands, budget_bytes).argmax(0)[0])
    return best_pruned(p, side, fixed, quant, cands, budget_bytes)

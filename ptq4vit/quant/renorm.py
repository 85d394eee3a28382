"""Row renormalization of a quantized operand whose rows carry a fixed mass (post-softmax probabilities).

A softmax row sums to 1, and at 4 bits most of its entries are far below the quantizer's step:
rounding them to zero removes a share of the row's mass that differs from row to row (flat rows
lose most), so ``softmax @ v`` shrinks towards zero by a row-dependent factor. Scaling each
quantized row by ``sum(x_row) / sum(q(x)_row)`` restores its mass. The factor is one float per
row; in integer arithmetic it multiplies the row of the integer product's output, next to the
dequantization scales (docs/lowbit.md §9).
"""
from __future__ import annotations

import torch


def renormalize_rows(quantized: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``quantized`` with each row (last dim) scaled to sum to the matching row of ``x``.

    ``quantized`` may carry leading dims that ``x`` broadcasts over (a stack of candidates in
    the search). Computed in float32, returned in ``quantized``'s dtype. A row whose codes are
    all zero has no mass to scale and stays zero.
    """
    q32 = quantized.float()
    q_mass = q32.sum(-1, keepdim=True)
    x_mass = x.float().sum(-1, keepdim=True)
    factor = torch.where(q_mass != 0, x_mass / torch.where(q_mass != 0, q_mass, torch.ones_like(q_mass)),
                         torch.ones_like(q_mass))
    return (q32 * factor).to(quantized.dtype)

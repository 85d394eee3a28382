"""Seeded orthogonal matrices: randomized Hadamard where the size allows, random orthogonal otherwise.

A size ``n = m · 2^k`` gets ``A ⊗ (diag(±1) · H_{2^k} / √2^k)`` with ``A`` a random ``m x m``
orthogonal matrix (``m = 1`` for powers of two): the Hadamard factor spreads any one channel
evenly over ``2^k`` channels, which is what removes channel outliers (docs/lowbit.md §2).
``kind="orthogonal"`` always uses one dense random orthogonal matrix (QR of a Gaussian).
Everything is built in float64 on the CPU from an explicit ``torch.Generator``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from ..presets import ROTATION_KINDS


def hadamard(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of size ``n`` (a power of two), entries ±1, float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard matrices exist for powers of two only, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    """A random ``n x n`` orthogonal matrix (Haar measure: QR of a Gaussian with the signs of diag(R) fixed)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    d = torch.diagonal(r)
    return (q * torch.where(d < 0, -1.0, 1.0).to(q)).contiguous()


def _split_pow2(n: int) -> tuple[int, int]:
    """``(m, p)`` with ``n = m · p``, ``p`` the largest power of two dividing ``n``."""
    p = n & -n
    return n // p, p


@dataclass
class KroneckerRotation:
    """An orthogonal ``R = left ⊗ right`` (``left``: m x m, ``right``: p x p), float64.

    ``x @ R`` for ``x`` of last dim ``m·p`` is ``leftᵀ · X · right`` with ``X`` the ``(m, p)``
    view of x, which costs ``m + p`` instead of ``m·p`` multiply-adds per value.
    """
    left: torch.Tensor
    right: torch.Tensor

    @property
    def size(self) -> int:
        return self.left.shape[0] * self.right.shape[0]

    def dense(self) -> torch.Tensor:
        return torch.kron(self.left.contiguous(), self.right.contiguous())


def make_rotation(n: int, kind: str, gen: torch.Generator) -> KroneckerRotation:
    """A seeded orthogonal transform of size ``n`` (see the module docstring)."""
    if kind not in ROTATION_KINDS:
        raise UserError(f"rotation kind must be one of {ROTATION_KINDS}, got {kind!r}")
    if kind == "orthogonal":
        return KroneckerRotation(random_orthogonal(n, gen), torch.ones(1, 1, dtype=torch.float64))
    m, p = _split_pow2(n)
    signs = torch.randint(0, 2, (p,), generator=gen, dtype=torch.int64).double().mul_(2).sub_(1)
    right = signs.unsqueeze(1) * hadamard(p) / p ** 0.5
    left = random_orthogonal(m, gen) if m > 1 else torch.ones(1, 1, dtype=torch.float64)
    return KroneckerRotation(left, right)


def fixing_ones(q: torch.Tensor) -> torch.Tensor:
    """``q`` followed by the Householder reflection that takes ``u q`` back to ``u = 1/√n``: an orthogonal
    matrix with ``1ᵀ Q = 1ᵀ``, which therefore commutes with centring (``C Q = Q C``, ``C = I - 11ᵀ/n``)
    and leaves a LayerNorm's normalization of ``x Q`` equal to that of ``x`` rotated by ``Q``."""
    n = q.shape[0]
    u = torch.full((n,), n ** -0.5, dtype=q.dtype, device=q.device)
    w = u @ q - u
    norm2 = w @ w
    if norm2 < 1e-24:  # q fixes u already
        return q
    return q - 2.0 * torch.outer(q @ w, w) / norm2

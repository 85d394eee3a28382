"""The float modules a rotation leaves in a model (docs/lowbit.md §2): the norm a LayerNorm becomes,
the one rotation that runs on activations at inference (fc2's input), and the norm that writes a
rotated stream (Swin's patch-embedding norm). Plain tensor ops, so they trace into ONNX at any
opset (``nn.RMSNorm`` needs opset 23)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .orthogonal import KroneckerRotation


class OnlineRotation(nn.Module):
    """``x @ (left ⊗ right)`` applied to activations (its transpose is folded into the next layer)."""

    def __init__(self, rot: KroneckerRotation, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.register_buffer("left", rot.left.to(device=device, dtype=dtype))
        self.register_buffer("right", rot.right.to(device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, p = self.left.shape[0], self.right.shape[0]
        xv = x.reshape(*x.shape[:-1], m, p) @ self.right.to(x.dtype)
        if m > 1:
            xv = self.left.t().to(x.dtype) @ xv
        return xv.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"{self.left.shape[0]} x {self.right.shape[0]}"


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps)`` over the last dim: LayerNorm on a zero-mean input, without affine."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class RotatedLayerNorm(nn.Module):
    """``LN₀(x) @ weightᵀ + bias``: an affine-free LayerNorm and a fixed ``dim x dim`` map.

    What a LayerNorm whose output is a rotated residual stream becomes: its affine ``γ, β``, the
    centring of its output and the rotation ``Q`` do not commute with one another, so they are folded
    into one matrix (``weightᵀ = diag(γ) C Q``, ``bias = β C Q`` with ``C`` the centring matrix).
    """

    def __init__(self, dim: int, eps: float, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.layer_norm(x, (self.dim,), eps=self.eps), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"

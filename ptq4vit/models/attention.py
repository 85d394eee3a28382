"""Quantized replacements for timm's attention modules.

They compute what timm's non-fused path computes, with the two attention matmuls as
:class:`QuantMatMul` sites. The ``* scale`` of q@kᵀ is applied after the matmul so that the
unscaled q and k are what gets quantized (docs/method.md §1); with quantization off this differs from
timm only by float rounding when the head dim is not a power of four.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

from ..nn import QuantLinear, QuantMatMul


class QuantAttention(nn.Module):
    """Replacement for ``timm.layers.Attention`` (ViT, DeiT)."""

    def __init__(self, attn: nn.Module, qkv: QuantLinear, proj: QuantLinear, matmul1: QuantMatMul, matmul2: QuantMatMul):
        super().__init__()
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.scale = attn.scale
        self.qkv = qkv
        self.q_norm = attn.q_norm
        self.k_norm = attn.k_norm
        self.matmul1 = matmul1
        self.attn_drop = attn.attn_drop
        self.matmul2 = matmul2
        self.norm = attn.norm
        self.proj = proj
        self.proj_drop = attn.proj_drop

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.matmul1(q, k.transpose(-2, -1)) * self.scale
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.matmul2(attn, v)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        return self.proj_drop(self.proj(x))


class QuantWindowAttention(nn.Module):
    """Replacement for Swin's ``WindowAttention``: relative position bias and shift mask stay float."""

    def __init__(self, attn: nn.Module, qkv: QuantLinear, proj: QuantLinear, matmul1: QuantMatMul, matmul2: QuantMatMul):
        super().__init__()
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.window_area = attn.window_area
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        self.qkv = qkv
        self.matmul1 = matmul1
        self.attn_drop = attn.attn_drop
        self.matmul2 = matmul2
        self.proj = proj
        self.proj_drop = attn.proj_drop

    def _rel_pos_bias(self) -> torch.Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = self.matmul1(q, k.transpose(-2, -1)) * self.scale
        attn = attn + self._rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.matmul2(attn, v)
        x = x.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))

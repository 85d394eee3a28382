"""The quantized replacement of timm's ``Attention`` (fused qkv, softmax attention, proj), shared by
every family whose blocks use it: the two attention matmuls become sites (docs/method.md §1)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..nn import FloatMatMul, QuantLinear, QuantMatMul


def additive_attention_mask(seq_len: int, scores: torch.Tensor, attn_mask: Optional[torch.Tensor],
                            is_causal: bool) -> Optional[torch.Tensor]:
    """The bias added to attention scores, with ``scaled_dot_product_attention``'s mask meaning.

    ``is_causal`` masks future positions; a boolean mask keeps ``True`` positions; a float mask
    is added as it is.
    """
    if is_causal:
        return scores.new_full((seq_len, seq_len), float("-inf")).triu_(1)
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill_(~attn_mask, float("-inf"))


class QuantAttention(nn.Module):
    """Replacement for timm's ``Attention`` with the two attention matmuls as sites.

    Computes what timm's non-fused path computes. The ``* scale`` of q@kᵀ is applied after the
    matmul so that the unscaled q and k are what gets quantized (docs/method.md §1); with
    quantization off this differs from timm only by float rounding when the head dim is not a
    power of four.
    """

    def __init__(self, attn: nn.Module, qkv: QuantLinear, proj: QuantLinear, matmul1: "QuantMatMul | FloatMatMul",
                 matmul2: "QuantMatMul | FloatMatMul"):
        super().__init__()
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.scale = attn.scale
        self.qkv = qkv
        self.q_norm = attn.q_norm  # Identity (the adapter refuses q/k norm); kept to mirror timm's attributes
        self.k_norm = attn.k_norm
        self.matmul1 = matmul1
        self.attn_drop = attn.attn_drop
        self.matmul2 = matmul2
        self.norm = getattr(attn, "norm", None) or nn.Identity()
        self.proj = proj
        self.proj_drop = attn.proj_drop

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.matmul1(q, k.transpose(-2, -1)) * self.scale
        bias = additive_attention_mask(N, attn, attn_mask, is_causal)
        if bias is not None:
            attn = attn + bias
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.matmul2(attn, v)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        return self.proj_drop(self.proj(x))

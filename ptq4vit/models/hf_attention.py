"""The quantized replacement of Hugging Face ``transformers``' vision self-attention (separate q/k/v
projections, softmax attention, an output projection): q, k and v are fused into one ``qkv`` linear
layer, so that the model has the sites timm's ViT has (one input quantizer for the three, one weight
scale per q/k/v block, docs/method.md §1) and the two attention matmuls are sites too."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..nn import FloatMatMul, QuantLinear, QuantMatMul
from .attention import additive_attention_mask


def fused_qkv(q: nn.Linear, k: nn.Linear, v: nn.Linear) -> nn.Linear:
    """One linear layer whose output rows are q's, then k's, then v's (weights copied, same device and dtype)."""
    w = q.weight
    fused = nn.Linear(q.in_features, q.out_features + k.out_features + v.out_features, bias=q.bias is not None,
                      device=w.device, dtype=w.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
        if q.bias is not None:
            fused.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
    return fused


class QuantHFAttention(nn.Module):
    """Replacement for a ``transformers`` ViT-style attention module (``q_proj``, ``k_proj``, ``v_proj``
    and the output projection named ``proj_name``).

    Computes what ``transformers``' eager attention computes: ``softmax(q kᵀ · scaling + mask) v`` with
    the softmax in float32, then the output projection; it returns ``(output, None)`` as the layer that
    calls it expects. The ``· scaling`` comes after the matmul, so the unscaled q and k are quantized.
    """

    def __init__(self, attn: nn.Module, qkv: QuantLinear, proj: QuantLinear, proj_name: str,
                 matmul1: "QuantMatMul | FloatMatMul", matmul2: "QuantMatMul | FloatMatMul"):
        super().__init__()
        self.num_heads = int(getattr(attn, "num_attention_heads", getattr(attn, "num_heads", 0)))
        self.head_dim = int(attn.head_dim)
        self.scaling = float(getattr(attn, "scaling", getattr(attn, "scale", self.head_dim ** -0.5)))
        self.qkv = qkv
        self.matmul1 = matmul1
        self.attn_drop = nn.Dropout(float(getattr(attn, "attention_dropout", getattr(attn, "dropout", 0.0))))
        self.matmul2 = matmul2
        self.proj_name = proj_name
        setattr(self, proj_name, proj)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs) -> tuple[torch.Tensor, None]:
        B, N, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = self.matmul1(q, k.transpose(-2, -1)) * self.scaling
        bias = additive_attention_mask(N, attn, attention_mask, False)
        if bias is not None:
            attn = attn + bias
        attn = self.attn_drop(attn.softmax(dim=-1, dtype=torch.float32).to(q.dtype))
        x = self.matmul2(attn, v).transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return getattr(self, self.proj_name)(x), None

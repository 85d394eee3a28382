"""The fused qkv projection of BEiT-style attention (BEiT, EVA, Swin V2) as one linear layer.

These attention modules keep ``qkv`` bias-free and add ``cat(q_bias, k_bias, v_bias)`` (``k_bias``
a zero buffer) in ``F.linear``; the quantization site is that whole product, so its linear layer
takes the concatenated bias as its own (the weight is the same tensor).
"""
from __future__ import annotations

import torch
from torch import nn


def biased_qkv(attn: nn.Module) -> nn.Linear:
    """``attn.qkv`` with ``attn``'s separate q/k/v biases (if any) folded into its bias."""
    qkv = attn.qkv
    q_bias = getattr(attn, "q_bias", None)
    if q_bias is None:
        return qkv
    linear = nn.Linear(qkv.in_features, qkv.out_features, bias=False, device="meta")
    linear.weight = qkv.weight
    linear.bias = nn.Parameter(torch.cat((q_bias, attn.k_bias, attn.v_bias)).detach().clone(),
                               requires_grad=q_bias.requires_grad)
    return linear


def check_qkv_bias_layout(p, path: str, attn: nn.Module) -> None:
    """Refuse a bias that is not added inside the qkv product (``qkv_bias_separate=True``: the
    float model adds it after the matmul; the fused site would compute it in another order)."""
    if getattr(attn, "qkv_bias_separate", False) and getattr(attn, "q_bias", None) is not None:
        raise p.refuse(path, attn, "qkv_bias_separate=True (the q/k/v bias added after the qkv product) is not "
                                   "supported: the qkv site adds its bias inside the product")
    if attn.qkv.bias is not None and getattr(attn, "q_bias", None) is not None:  # the forward would ignore it
        raise p.refuse(f"{path}.qkv", attn.qkv, "a qkv bias besides q_bias/v_bias is not a layout this adapter knows")


def has_qkv_bias(attn: nn.Module) -> bool:
    """Whether the attention (float, or its quantized replacement holding the folded bias) has a qkv bias."""
    return getattr(attn, "q_bias", None) is not None or attn.qkv.bias is not None


def move_qkv_biases(attn: nn.Module) -> None:
    """``F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias))`` as ``qkv(x)``: the biases become qkv's own."""
    if attn.q_bias is None:
        return
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)).detach().clone()
    attn.qkv.bias = nn.Parameter(bias, requires_grad=attn.q_bias.requires_grad)
    attn.q_bias, attn.k_bias, attn.v_bias = None, None, None

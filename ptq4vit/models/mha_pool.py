"""A learned-probe attention-pool head built on ``nn.MultiheadAttention`` (Hugging Face SigLIP's
``SiglipMultiheadAttentionPoolingHead``), as quantization sites.

A probe (a parameter, one token) attends over the tokens through ``nn.MultiheadAttention``; then
``x + mlp(layernorm(x))`` and the probe's token is the output. The packed in-projection is split
into a ``q`` site (its input is the probe, a constant) and a ``kv`` site (its input is the final
norm's output; one weight scale per k and v block), as in timm's ``AttentionPoolLatent``
(:mod:`.attention_pool`); ``out_proj``, ``q @ kᵀ`` and ``softmax @ v`` are sites, the MLP's fc1 and
fc2 too. Stays float: the probe, the LayerNorm.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ..nn import FloatMatMul, QuantLinear, QuantMatMul
from .adapter import NORMS, SitePlan
from .sites import SiteBuilder


def split_in_projection(mha: nn.MultiheadAttention) -> tuple[nn.Linear, nn.Linear]:
    """``(q, kv)``: linear layers holding copies of the rows q and k, v of ``mha``'s packed in-projection."""
    c = mha.embed_dim
    w, b = mha.in_proj_weight, mha.in_proj_bias
    layers = []
    for rows in (slice(0, c), slice(c, 3 * c)):
        lin = nn.Linear(c, rows.stop - rows.start, bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w[rows])
            if b is not None:
                lin.bias.copy_(b[rows])
        layers.append(lin)
    return layers[0], layers[1]


class QuantProbePool(nn.Module):
    """Replacement for ``SiglipMultiheadAttentionPoolingHead``: the ``* scale`` of ``q @ kᵀ`` comes after
    the matmul (so the unscaled q and k are quantized)."""

    def __init__(self, head: nn.Module, q: QuantLinear, kv: QuantLinear, out_proj: QuantLinear,
                 matmul1: "QuantMatMul | FloatMatMul", matmul2: "QuantMatMul | FloatMatMul"):
        super().__init__()
        mha = head.attention
        self.num_heads = mha.num_heads
        self.head_dim = mha.head_dim
        self.scale = mha.head_dim ** -0.5
        self.probe = head.probe
        self.q = q
        self.kv = kv
        self.matmul1 = matmul1
        self.matmul2 = matmul2
        self.out_proj = out_proj
        self.layernorm = head.layernorm
        self.mlp = head.mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        probe = self.probe.repeat(B, 1, 1)
        if x.requires_grad and not probe.requires_grad:
            # Calibration captures with the parameters' gradients off, so the probe would be cut off from the
            # autograd graph and q's output gradient (the hessian metric's weight) never computed: adding 0·x
            # joins it to the input's graph without changing a bit of its value.
            probe = probe + 0 * x[:, :1, :1]
        L = probe.shape[1]
        q = self.q(probe).reshape(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (self.matmul1(q, k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        h = self.out_proj(self.matmul2(attn, v).transpose(1, 2).reshape(B, L, C))
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]


def plan_probe_pool(p: SitePlan, path: str, head: nn.Module, build: SiteBuilder, mlp_planner) -> None:
    """Plan the probe-attention pool head at ``path`` (replaced by :class:`QuantProbePool`); ``mlp_planner``
    plans its MLP (``(plan, path, mlp, build)``)."""
    mha = head.attention
    if type(mha) is not nn.MultiheadAttention:
        raise p.refuse(f"{path}.attention", mha, "only nn.MultiheadAttention is a known pooling attention")
    if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
        raise p.refuse(f"{path}.attention", mha, "separate q/k/v weights (kdim/vdim other than embed_dim) are not "
                                                 "supported")
    if mha.bias_k is not None or mha.add_zero_attn:
        raise p.refuse(f"{path}.attention", mha, "add_bias_kv / add_zero_attn add key/value positions that "
                                                 "calibration and export do not model")
    if not mha.batch_first:
        raise p.refuse(f"{path}.attention", mha, "batch_first=False (sequence-first inputs) is not supported")

    def replace(h: nn.Module) -> QuantProbePool:
        q, kv = split_in_projection(h.attention)
        return QuantProbePool(h, build.linear(q), build.linear(kv, w_groups=2, smooth=True, asymmetric=True),
                              build.linear(h.attention.out_proj), *build.attention_matmuls(h.attention.num_heads, kv))

    p.replaced_with_parts(path, replace)
    p.part(f"{path}.attention", mha, (nn.MultiheadAttention,), "the pooling attention")
    p.part(f"{path}.attention.out_proj", mha.out_proj, (NonDynamicallyQuantizableLinear,), "the output projection")
    p.part(f"{path}.layernorm", head.layernorm, NORMS, "the norm before the MLP")
    mlp_planner(p, f"{path}.mlp", head.mlp, build)  # the MLP stays a child of the replacement: fc1/fc2 are sites

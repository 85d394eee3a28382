"""timm's attention-pool head, ``AttentionPoolLatent`` (``global_pool='map'``: the SigLIP image
towers ``vit_*_siglip_*``, EVA ``global_pool='map'``), as quantization sites.

A learned latent query attends over the tokens: its q, kv and proj are linear sites, ``q @ kᵀ``
and ``softmax @ v`` are matmul sites, its MLP is a timm ``Mlp`` (fc1 and fc2 sites). Stays float:
the latent query and the optional position embedding (parameters), the norm before the MLP,
dropout. q/k normalisation is refused (the matmul operands would be normalised q and k).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from timm.layers import AttentionPoolLatent

from ..nn import FloatMatMul, QuantLinear, QuantMatMul
from .adapter import DROPOUTS, NORMS, SitePlan
from .attention import additive_attention_mask
from .sites import SiteBuilder


class QuantAttentionPool(nn.Module):
    """Replacement for ``AttentionPoolLatent`` with q, kv, proj and the two attention matmuls as sites.
    The ``* scale`` of ``q @ kᵀ`` is applied after the matmul (so unscaled q and k are quantized)."""

    def __init__(self, pool: nn.Module, q: QuantLinear, kv: QuantLinear, proj: "QuantLinear | nn.Identity",
                 matmul1: "QuantMatMul | FloatMatMul", matmul2: "QuantMatMul | FloatMatMul"):
        super().__init__()
        self.num_heads = pool.num_heads
        self.head_dim = pool.head_dim
        self.scale = pool.scale
        self.pool = pool.pool
        self.latent_len = pool.latent_len
        self.latent = pool.latent
        self.pos_embed = pool.pos_embed
        self.q = q
        self.kv = kv
        self.q_norm = pool.q_norm  # Identity (q/k norm is refused); kept to mirror timm's attributes
        self.k_norm = pool.k_norm
        self.matmul1 = matmul1
        self.matmul2 = matmul2
        self.proj = proj
        self.proj_drop = pool.proj_drop
        self.norm = pool.norm
        self.mlp = pool.mlp

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, C = x.shape
        if self.pos_embed is not None:
            x = x + self.pos_embed.unsqueeze(0).to(x.dtype)
        latent = self.latent.expand(B, -1, -1)
        if x.requires_grad and not latent.requires_grad:
            # Calibration captures with the parameters' gradients off, so the latent query would be cut off
            # from the autograd graph and q's output gradient (the hessian metric's weight) never computed:
            # adding 0·x joins it to the input's graph without changing a bit of its value.
            latent = latent + 0 * x[:, :1, :1]
        q = self.q(latent).reshape(B, self.latent_len, self.num_heads, self.head_dim)
        q = q.transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.matmul1(q, k.transpose(-2, -1)) * self.scale
        bias = additive_attention_mask(N, attn, attn_mask, False)
        if bias is not None:
            attn = attn + bias
        x = self.matmul2(attn.softmax(dim=-1), v).transpose(1, 2).reshape(B, self.latent_len, C)
        x = self.proj_drop(self.proj(x))
        if self.mlp is not None:
            x = x + self.mlp(self.norm(x))
        if self.pool == "token":
            return x[:, 0]
        if self.pool == "avg":
            return x.mean(1)
        return x


def plan_attention_pool(p: SitePlan, path: str, pool: nn.Module, build: SiteBuilder) -> None:
    """Plan timm's ``AttentionPoolLatent`` at ``path`` (replaced by :class:`QuantAttentionPool`)."""
    if type(pool) is not AttentionPoolLatent:
        raise p.refuse(path, pool, "only timm's AttentionPoolLatent is a known attention-pool head")
    for name in ("q_norm", "k_norm"):
        if type(getattr(pool, name)) is not nn.Identity:
            raise p.refuse(f"{path}.{name}", getattr(pool, name),
                           "q/k normalisation (qk_norm=True) is not supported: the attention matmul operands would "
                           "be the normalised q and k, which calibration and export do not model")
    if type(pool.q) is not nn.Linear:
        raise p.refuse(f"{path}.q", pool.q, "an attention pool without a query projection (q_proj=False) is not "
                                            "supported")

    def replace(a: nn.Module) -> QuantAttentionPool:
        proj = build.linear(a.proj) if isinstance(a.proj, nn.Linear) else a.proj
        # q's input is the learned latent (a constant), kv's is the final norm's output
        return QuantAttentionPool(a, build.linear(a.q), build.linear(a.kv, w_groups=2, smooth=True, asymmetric=True),
                                  proj, *build.attention_matmuls(a.num_heads, a.kv))

    p.replaced_with_parts(path, replace)
    p.part(f"{path}.q", pool.q, (nn.Linear,), "the latent query projection")
    p.part(f"{path}.kv", pool.kv, (nn.Linear,), "the key/value projection")
    p.part(f"{path}.q_norm", pool.q_norm, (nn.Identity,), "q norm")
    p.part(f"{path}.k_norm", pool.k_norm, (nn.Identity,), "k norm")
    if isinstance(pool.proj, nn.Identity):  # out_features=0: pre-logits mode, no projection or MLP
        p.part(f"{path}.proj", pool.proj, (nn.Identity,), "the output projection")
    else:
        p.part(f"{path}.proj", pool.proj, (nn.Linear,), "the output projection")
    p.part(f"{path}.proj_drop", pool.proj_drop, DROPOUTS, "projection dropout")
    p.part(f"{path}.norm", pool.norm, NORMS, "the norm before the MLP")
    if pool.mlp is not None:
        # the MLP stays a child of the replacement: its fc1/fc2 are sites of their own
        p.mlp(f"{path}.mlp", pool.mlp, build)

"""Adapter for timm's ``Beit`` (BEiT, BEiT v2): relative position bias, LayerScale.

Quantization sites: the patch-embedding conv, every block's qkv (its q/v biases folded into the
site's bias, :mod:`.qkv_bias`), the two attention matmuls, proj, fc1 and fc2 (or a gated MLP's
fc1_g, fc1_x and fc2, ``swiglu_mlp=True``), and the classifier ``head``. Stays float: the class
token and position embedding, the relative position bias (per block or shared, added to the
scores after the first matmul), norms, LayerScale (``gamma_1``/``gamma_2``, parameters of the
block), dropouts and stochastic depth, average pooling.
The rotations (``rotq``) fold as in a ViT (:mod:`.beit_rotation`: the q/v biases moved into qkv's
bias, gamma_1/gamma_2 folded into proj/fc2); a gated MLP or ``scale_mlp`` refuses them by name.
Anything else is refused by name.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from timm.layers import Mlp
from timm.models.beit import Attention, Beit, Block, RelativePositionBias

from ..nn import FloatMatMul, QuantLinear, QuantMatMul
from ..transforms.modules import OnlineRotation
from ..transforms.rotation_layout import RotationLayout
from .adapter import DROPOUTS, NORMS, Adapter, SitePlan, child_paths, timm_pooled_features
from .beit_rotation import beit_rotation_layout
from .create_args import BOOL, BOOL_OR_NONE, NUMBER_OR_NONE, POSITIVE_INT, POSITIVE_NUMBER, SIZE, one_of
from .glu import plan_mlp_or_glu
from .qkv_bias import biased_qkv, check_qkv_bias_layout, has_qkv_bias
from .sites import SiteBuilder


class QuantBeitAttention(nn.Module):
    """Replacement for BEiT's ``Attention``: the relative position biases stay float, added after
    ``q @ kᵀ``; the ``* scale`` is applied after the matmul (so unscaled q and k are quantized)."""

    def __init__(self, attn: nn.Module, qkv: QuantLinear, proj: QuantLinear, matmul1: "QuantMatMul | FloatMatMul",
                 matmul2: "QuantMatMul | FloatMatMul"):
        super().__init__()
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.window_size = attn.window_size
        self.relative_position_bias_table = attn.relative_position_bias_table
        if attn.relative_position_index is not None:
            self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        else:
            self.relative_position_index = None
        self.qkv = qkv
        self.matmul1 = matmul1
        self.attn_drop = attn.attn_drop
        self.matmul2 = matmul2
        self.proj = proj
        self.proj_drop = attn.proj_drop

    def _rel_pos_bias(self) -> torch.Tensor:
        area = self.window_size[0] * self.window_size[1] + 1
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(area, area, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = self.matmul1(q, k.transpose(-2, -1)) * self.scale
        if self.relative_position_bias_table is not None:
            attn = attn + self._rel_pos_bias()
        if shared_rel_pos_bias is not None:
            attn = attn + shared_rel_pos_bias
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.matmul2(attn, v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class BeitAdapter(Adapter):
    family = "timm Beit"
    model_classes = (Beit,)
    timm_modules = ("timm.models.beit",)
    create_args = dict(
        patch_size=SIZE, embed_dim=POSITIVE_INT, depth=POSITIVE_INT, num_heads=POSITIVE_INT, mlp_ratio=POSITIVE_NUMBER,
        qkv_bias=BOOL, swiglu_mlp=BOOL, scale_mlp=BOOL, init_values=NUMBER_OR_NONE, use_abs_pos_emb=BOOL,
        use_rel_pos_bias=BOOL, use_shared_rel_pos_bias=BOOL, use_fc_norm=BOOL_OR_NONE,
        global_pool=one_of("", "token", "avg"),
    )

    def blocks(self, model: nn.Module) -> list[str]:
        """``blocks.i``."""
        return child_paths(model, "blocks")

    def head_features(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The final norm, then what ``forward_head`` pools before its classifier (timm's convention)."""
        return timm_pooled_features(model)

    def create_kwargs(self, model: nn.Module) -> dict:
        blk = model.blocks[0]
        swiglu = type(blk.mlp) is not Mlp
        hidden = blk.mlp.fc2.in_features
        return dict(
            patch_size=list(model.patch_embed.patch_size), embed_dim=model.embed_dim, depth=len(model.blocks),
            num_heads=blk.attn.num_heads, mlp_ratio=hidden / model.embed_dim, qkv_bias=has_qkv_bias(blk.attn),
            # a rotated model's online rotation sits in the MLP's identity norm slot (scale_mlp=False)
            swiglu_mlp=swiglu, scale_mlp=not isinstance(blk.mlp.norm, (nn.Identity, OnlineRotation)),
            init_values=None if blk.gamma_1 is None else 0.1,  # any value: gamma comes from the file
            use_abs_pos_emb=model.pos_embed is not None,
            use_rel_pos_bias=blk.attn.relative_position_bias_table is not None,
            use_shared_rel_pos_bias=model.rel_pos_bias is not None,
            use_fc_norm=not isinstance(model.fc_norm, nn.Identity), global_pool=model.global_pool,
        )

    def plan(self, model: nn.Module, build: SiteBuilder) -> SitePlan:
        p = SitePlan(self.family)
        p.container("")
        p.patch_embed("patch_embed", model.patch_embed, build)
        p.keep_float("pos_drop", model.pos_drop, DROPOUTS, "dropout")
        if model.rel_pos_bias is not None:  # shared by every block: a float table added to the scores
            p.keep_float("rel_pos_bias", model.rel_pos_bias, (RelativePositionBias,), "shared relative position bias")
        p.container("blocks")
        for i, block in enumerate(model.blocks):
            self._plan_block(p, f"blocks.{i}", block, build)
        p.keep_float("norm", model.norm, NORMS, "norm")
        p.keep_float("fc_norm", model.fc_norm, NORMS, "norm")
        p.keep_float("head_drop", model.head_drop, DROPOUTS, "dropout")
        p.classifier("head", model.head, build)
        return p

    def rotation_layout(self, model: nn.Module, residual: bool) -> RotationLayout:
        return beit_rotation_layout(model, residual)

    def _plan_block(self, p: SitePlan, path: str, block: nn.Module, build: SiteBuilder) -> None:
        if type(block) is not Block:
            raise p.refuse(path, block, "only timm's BEiT Block (norm1, attn, gamma_1, norm2, mlp, gamma_2) is a "
                                        "known block layout")
        p.pre_norm_block(path, block, lambda q, attn: self._plan_attention(p, q, attn, build),
                         lambda q, mlp: plan_mlp_or_glu(p, q, mlp, build))

    def _plan_attention(self, p: SitePlan, path: str, attn: nn.Module, build: SiteBuilder) -> None:
        if type(attn) is not Attention:
            raise p.refuse(path, attn, "only timm's BEiT Attention is a known attention layout; its matmuls would "
                                       "otherwise stay float")
        check_qkv_bias_layout(p, path, attn)
        p.replaced_with_parts(path, lambda a: QuantBeitAttention(
            a, build.qkv_linear(biased_qkv(a)), build.linear(a.proj), *build.attention_matmuls(a.num_heads, a.qkv)))
        p.part(f"{path}.qkv", attn.qkv, (nn.Linear,), "the qkv projection")
        p.part(f"{path}.proj", attn.proj, (nn.Linear,), "the output projection")
        p.part(f"{path}.attn_drop", attn.attn_drop, (nn.Dropout,), "attention dropout")
        p.part(f"{path}.proj_drop", attn.proj_drop, (nn.Dropout,), "projection dropout")

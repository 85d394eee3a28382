"""Adapter for timm's ``SwinTransformer`` (Swin v1), shifted windows and patch merging included.

Quantization sites (docs/method.md §1): the patch-embedding conv, every block's qkv and proj,
the two window-attention matmuls, fc1 and fc2, each patch-merging ``reduction`` and the
classifier ``head.fc``. Stays float: the relative position bias and the shift mask (added to
the scores after the first matmul), norms, dropouts, stochastic depth, pooling.
Anything else (another block or attention class, a stray Linear/Conv) is refused by name.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from timm.models.swin_transformer import (PatchMerging, SwinTransformer, SwinTransformerBlock, SwinTransformerStage,
                                          WindowAttention)

from ..nn import FloatMatMul, QuantLinear, QuantMatMul
from ..transforms.modules import RotatedLayerNorm
from ..transforms.rotation_layout import RotationLayout
from .adapter import DROPOUTS, NORMS, Adapter, SitePlan, child_paths, timm_pooled_features
from .create_args import BOOL, POSITIVE_INT, POSITIVE_INTS, POSITIVE_NUMBER, SIZE, one_of
from .sites import SiteBuilder
from .swin_rotation import swin_rotation_layout


def add_shift_mask(scores: torch.Tensor, mask: Optional[torch.Tensor], num_heads: int, n: int) -> torch.Tensor:
    """``scores`` (windows x batch, heads, n, n) plus the shifted windows' mask (windows, n, n), if any."""
    if mask is None:
        return scores
    scores = scores.view(-1, mask.shape[0], num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
    return scores.view(-1, num_heads, n, n)


class QuantWindowAttention(nn.Module):
    """Replacement for Swin's ``WindowAttention``: relative position bias and shift mask stay float."""

    def __init__(self, attn: nn.Module, qkv: QuantLinear, proj: QuantLinear, matmul1: "QuantMatMul | FloatMatMul",
                 matmul2: "QuantMatMul | FloatMatMul"):
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
        attn = add_shift_mask(attn, mask, self.num_heads, N)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.matmul2(attn, v)
        x = x.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


class SwinAdapter(Adapter):
    family = "timm SwinTransformer"
    model_classes = (SwinTransformer,)
    timm_modules = ("timm.models.swin_transformer",)
    create_args = dict(
        patch_size=POSITIVE_INT, embed_dim=POSITIVE_INT, depths=POSITIVE_INTS, num_heads=POSITIVE_INTS,
        window_size=SIZE, mlp_ratio=POSITIVE_NUMBER, qkv_bias=BOOL, global_pool=one_of("", "avg", "avgmax", "max"),
    )

    def blocks(self, model: nn.Module) -> list[str]:
        """``layers.i.blocks.j``, stage by stage."""
        return [p for i in range(len(model.layers)) for p in child_paths(model, f"layers.{i}.blocks")]

    def head_features(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The final norm, then what ``forward_head`` pools before its classifier (timm's convention)."""
        return timm_pooled_features(model)

    def create_kwargs(self, model: nn.Module) -> dict:
        layers = list(model.layers)
        blk = layers[0].blocks[0]
        fc1 = blk.mlp.fc1
        return dict(
            patch_size=list(model.patch_embed.patch_size)[0],
            embed_dim=model.embed_dim if isinstance(model.embed_dim, int) else layers[0].dim,
            depths=[len(stage.blocks) for stage in layers], num_heads=[stage.blocks[0].attn.num_heads for stage in layers],
            window_size=list(blk.window_size), mlp_ratio=fc1.out_features / fc1.in_features,
            qkv_bias=blk.attn.qkv.bias is not None, global_pool=model.global_pool,
        )

    def plan(self, model: nn.Module, build: SiteBuilder) -> SitePlan:
        p = SitePlan(self.family)
        p.container("")
        p.patch_embed("patch_embed", model.patch_embed, build, norms=(*NORMS, RotatedLayerNorm))
        if getattr(model, "pos_drop", None) is not None:
            p.keep_float("pos_drop", model.pos_drop, DROPOUTS, "dropout")
        p.container("layers")
        for i, stage in enumerate(model.layers):
            self._plan_stage(p, f"layers.{i}", stage, build)
        p.keep_float("norm", model.norm, NORMS, "norm")
        p.classifier_head("head", model.head, build)
        return p

    def rotation_layout(self, model: nn.Module, residual: bool) -> RotationLayout:
        return swin_rotation_layout(model, residual)

    def _plan_stage(self, p: SitePlan, path: str, stage: nn.Module, build: SiteBuilder) -> None:
        if type(stage) is not SwinTransformerStage:
            raise p.refuse(path, stage, "only timm's SwinTransformerStage is a known stage layout")
        p.container(path)
        down = stage.downsample
        if type(down) is PatchMerging:
            p.container(f"{path}.downsample")
            p.keep_float(f"{path}.downsample.norm", down.norm, NORMS, "norm")
            p.site(f"{path}.downsample.reduction", down.reduction, nn.Linear, build.linear)
        else:
            p.keep_float(f"{path}.downsample", down, (nn.Identity,), "patch merging (PatchMerging or none)")
        p.container(f"{path}.blocks")
        for j, block in enumerate(stage.blocks):
            self._plan_block(p, f"{path}.blocks.{j}", block, build)

    def _plan_block(self, p: SitePlan, path: str, block: nn.Module, build: SiteBuilder) -> None:
        if type(block) is not SwinTransformerBlock:
            raise p.refuse(path, block, "only timm's SwinTransformerBlock is a known block layout")
        p.pre_norm_block(path, block, lambda q, attn: self._plan_attention(p, q, attn, build),
                         lambda q, mlp: p.mlp(q, mlp, build))

    def _plan_attention(self, p: SitePlan, path: str, attn: nn.Module, build: SiteBuilder) -> None:
        if type(attn) is not WindowAttention:
            raise p.refuse(path, attn, "only timm's WindowAttention is a known window attention layout; its matmuls "
                                       "would otherwise stay float")
        p.replaced_with_parts(path, lambda a: QuantWindowAttention(a, build.qkv_linear(a.qkv), build.linear(a.proj),
                                                                  *build.attention_matmuls(a.num_heads, a.qkv)))
        p.part(f"{path}.qkv", attn.qkv, (nn.Linear,), "the qkv projection")
        p.part(f"{path}.proj", attn.proj, (nn.Linear,), "the output projection")
        p.part(f"{path}.attn_drop", attn.attn_drop, (nn.Dropout,), "attention dropout")
        p.part(f"{path}.proj_drop", attn.proj_drop, (nn.Dropout,), "projection dropout")
        if getattr(attn, "softmax", None) is not None:
            p.part(f"{path}.softmax", attn.softmax, (nn.Softmax,), "softmax")

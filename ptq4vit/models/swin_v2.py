"""Adapter for timm's ``SwinTransformerV2``: cosine window attention, res-post-norm blocks.

Quantization sites: the patch-embedding conv, every block's qkv (its q/v biases folded into the
site's bias, :mod:`.qkv_bias`), the two window-attention matmuls (the first one's operands are
the L2-normalised q and k: cosine attention), proj, fc1 and fc2, each patch-merging
``reduction`` and the classifier ``head.fc``.

Stays float, listed here because two of them are linear layers: the continuous position bias
MLP ``cpb_mlp`` (Linear(2, 512), ReLU, Linear(512, heads): it maps the fixed relative coordinates
of the window to a bias table, it never sees an activation, so it is part of the attention's float
position bias like Swin v1's table), the learned logit scale (clamped, exponentiated, multiplied
into the scores), the shift mask, norms (post-norm ``norm1``/``norm2``, the patch-merging norm
after ``reduction``), dropouts, stochastic depth and pooling.

The blocks are post-norm (``x + norm1(attn(x))``): qkv and fc1 read the residual stream itself,
not a norm's output, so their inputs are not smoothed (no norm to fold a divisor into).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Mlp
from timm.layers.activations import GELU as TimmGELU
from timm.models.swin_transformer_v2 import (PatchMerging, SwinTransformerV2, SwinTransformerV2Block,
                                             SwinTransformerV2Stage, WindowAttention)

from ..nn import FloatMatMul, QuantLinear, QuantMatMul
from .adapter import ACTIVATIONS, DROPOUTS, NORMS, Adapter, SitePlan, child_paths, timm_pooled_features
from .create_args import BOOL, POSITIVE_INT, POSITIVE_INTS, POSITIVE_NUMBER, SIZE, ArgKind, one_of
from .qkv_bias import biased_qkv, check_qkv_bias_layout, has_qkv_bias
from .sites import SiteBuilder
from .swin import add_shift_mask


#: The exact (erf) GELU modules: torch's, and timm's own (what ``act_layer='gelu'`` builds), which
#: computes ``F.gelu(x)``; the post-GELU quantizers are designed for that function.
EXACT_GELUS = (nn.GELU, TimmGELU)


class QuantWindowAttentionV2(nn.Module):
    """Replacement for Swin V2's ``WindowAttention``: ``normalize(q) @ normalize(k)ᵀ`` and
    ``softmax @ v`` are sites; logit scale, position bias MLP and shift mask stay float."""

    def __init__(self, attn: nn.Module, qkv: QuantLinear, proj: QuantLinear, matmul1: "QuantMatMul | FloatMatMul",
                 matmul2: "QuantMatMul | FloatMatMul"):
        super().__init__()
        self.num_heads = attn.num_heads
        self.window_size = attn.window_size
        self.pretrained_window_size = attn.pretrained_window_size
        self.logit_scale = attn.logit_scale
        self.cpb_mlp = attn.cpb_mlp
        self.register_buffer("relative_coords_table", attn.relative_coords_table, persistent=False)
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        self.qkv = qkv
        self.matmul1 = matmul1
        self.softmax = attn.softmax
        self.attn_drop = attn.attn_drop
        self.matmul2 = matmul2
        self.proj = proj
        self.proj_drop = attn.proj_drop

    def _position_bias(self) -> torch.Tensor:
        area = self.window_size[0] * self.window_size[1]
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(area, area, -1).permute(2, 0, 1).contiguous()
        return 16 * torch.sigmoid(bias)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = self.matmul1(F.normalize(q, dim=-1), F.normalize(k, dim=-1).transpose(-2, -1))
        attn = attn * torch.clamp(self.logit_scale, max=math.log(1. / 0.01)).exp()
        attn = attn + self._position_bias().unsqueeze(0)
        attn = add_shift_mask(attn, mask, self.num_heads, N)
        attn = self.attn_drop(self.softmax(attn))
        x = self.matmul2(attn, v).transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(x))


def _check_cpb_mlp(p: SitePlan, path: str, cpb: nn.Module, num_heads: int) -> None:
    """The position bias MLP is exactly Linear(2, h), ReLU, Linear(h, heads): only then is it a
    function of the fixed window coordinates and nothing else (so it may stay float)."""
    layers = list(cpb.children()) if type(cpb) is nn.Sequential else []
    ok = (len(layers) == 3 and type(layers[0]) is nn.Linear and layers[0].in_features == 2
          and type(layers[1]) is nn.ReLU and type(layers[2]) is nn.Linear and layers[2].out_features == num_heads)
    if not ok:
        raise p.refuse(path, cpb, "the continuous position bias MLP must be Sequential(Linear(2, h), ReLU, "
                                  "Linear(h, num_heads)) to stay float")
    p.part(path, cpb, (nn.Sequential,), "the float continuous position bias MLP")


#: ``pretrained_window_sizes``: one per stage, 0 where the bias coordinates are normalised by the window itself.
WINDOW_SIZES = ArgKind("a list of integers >= 0", lambda v: isinstance(v, list) and len(v) > 0 and all(
    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v))


class SwinV2Adapter(Adapter):
    family = "timm SwinTransformerV2"
    model_classes = (SwinTransformerV2,)
    timm_modules = ("timm.models.swin_transformer_v2",)
    create_args = dict(
        patch_size=POSITIVE_INT, embed_dim=POSITIVE_INT, depths=POSITIVE_INTS, num_heads=POSITIVE_INTS,
        window_size=SIZE, mlp_ratio=POSITIVE_NUMBER, qkv_bias=BOOL, global_pool=one_of("", "avg", "avgmax", "max"),
        pretrained_window_sizes=WINDOW_SIZES,
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
            patch_size=list(model.patch_embed.patch_size)[0], embed_dim=model.embed_dim,
            depths=[len(stage.blocks) for stage in layers], num_heads=[stage.blocks[0].attn.num_heads for stage in layers],
            window_size=list(blk.attn.window_size), mlp_ratio=fc1.out_features / fc1.in_features,
            qkv_bias=has_qkv_bias(blk.attn), global_pool=model.global_pool,
            pretrained_window_sizes=[stage.blocks[0].attn.pretrained_window_size[0] for stage in layers],
        )

    def plan(self, model: nn.Module, build: SiteBuilder) -> SitePlan:
        p = SitePlan(self.family)
        p.container("")
        p.patch_embed("patch_embed", model.patch_embed, build)
        p.container("layers")
        for i, stage in enumerate(model.layers):
            self._plan_stage(p, f"layers.{i}", stage, build)
        p.keep_float("norm", model.norm, NORMS, "norm")
        p.classifier_head("head", model.head, build)
        return p

    def _plan_stage(self, p: SitePlan, path: str, stage: nn.Module, build: SiteBuilder) -> None:
        if type(stage) is not SwinTransformerV2Stage:
            raise p.refuse(path, stage, "only timm's SwinTransformerV2Stage is a known stage layout")
        p.container(path)
        down = stage.downsample
        if type(down) is PatchMerging:
            p.container(f"{path}.downsample")
            p.site(f"{path}.downsample.reduction", down.reduction, nn.Linear, build.linear)
            p.keep_float(f"{path}.downsample.norm", down.norm, NORMS, "norm")
        else:
            p.keep_float(f"{path}.downsample", down, (nn.Identity,), "patch merging (PatchMerging or none)")
        p.container(f"{path}.blocks")
        for j, block in enumerate(stage.blocks):
            self._plan_block(p, f"{path}.blocks.{j}", block, build)

    def _plan_block(self, p: SitePlan, path: str, block: nn.Module, build: SiteBuilder) -> None:
        if type(block) is not SwinTransformerV2Block:
            raise p.refuse(path, block, "only timm's SwinTransformerV2Block is a known block layout")
        p.container(path)
        self._plan_attention(p, f"{path}.attn", block.attn, build)
        p.keep_float(f"{path}.norm1", block.norm1, NORMS, "norm")
        mlp = block.mlp
        if type(mlp) is not Mlp or not isinstance(mlp.norm, nn.Identity):
            raise p.refuse(f"{path}.mlp", mlp, "only timm's Mlp (fc1, activation, fc2) is a known MLP layout")
        p.container(f"{path}.mlp")
        p.site(f"{path}.mlp.fc1", mlp.fc1, nn.Linear, lambda fc1: build.linear(fc1, asymmetric=True))
        p.keep_float(f"{path}.mlp.act", mlp.act, (*ACTIVATIONS, TimmGELU), "MLP activation")
        p.keep_float(f"{path}.mlp.drop1", mlp.drop1, DROPOUTS, "dropout")
        p.keep_float(f"{path}.mlp.norm", mlp.norm, (nn.Identity,), "MLP norm")
        if build.post_gelu_quantizer and type(mlp.act) not in EXACT_GELUS:
            raise p.refuse(f"{path}.mlp.act", mlp.act, "the post-GELU quantizers (gelu_twin, gelu_log) need nn.GELU")
        p.site(f"{path}.mlp.fc2", mlp.fc2, nn.Linear, build.post_gelu_linear)
        p.keep_float(f"{path}.mlp.drop2", mlp.drop2, DROPOUTS, "dropout")
        p.keep_float(f"{path}.norm2", block.norm2, NORMS, "norm")
        for name in ("drop_path1", "drop_path2"):
            p.keep_float(f"{path}.{name}", getattr(block, name), DROPOUTS, "stochastic depth")

    def _plan_attention(self, p: SitePlan, path: str, attn: nn.Module, build: SiteBuilder) -> None:
        if type(attn) is not WindowAttention:
            raise p.refuse(path, attn, "only timm's Swin V2 WindowAttention is a known window attention layout; its "
                                       "matmuls would otherwise stay float")
        check_qkv_bias_layout(p, path, attn)
        # the residual stream (post-norm blocks), not a norm's output: no smoothing divisor to fold
        p.replaced_with_parts(path, lambda a: QuantWindowAttentionV2(
            a, build.linear(biased_qkv(a), w_groups=3, asymmetric=True), build.linear(a.proj),
            *build.attention_matmuls(a.num_heads, a.qkv)))
        p.part(f"{path}.qkv", attn.qkv, (nn.Linear,), "the qkv projection")
        _check_cpb_mlp(p, f"{path}.cpb_mlp", attn.cpb_mlp, attn.num_heads)
        p.part(f"{path}.proj", attn.proj, (nn.Linear,), "the output projection")
        p.part(f"{path}.attn_drop", attn.attn_drop, (nn.Dropout,), "attention dropout")
        p.part(f"{path}.proj_drop", attn.proj_drop, (nn.Dropout,), "projection dropout")
        p.part(f"{path}.softmax", attn.softmax, (nn.Softmax,), "softmax")

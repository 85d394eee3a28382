"""Adapter for timm's ``VisionTransformer`` family: ViT, DeiT (distilled too), DINOv2-style.

Quantization sites (docs/method.md §1): the patch-embedding conv, every block's qkv and proj,
the two attention matmuls, fc1 and fc2 of the MLP, and the classifier head(s) (``head`` and,
for distilled DeiT, ``head_dist``). Everything else stays float: class / distillation /
register tokens and position embeddings, norms (``norm_pre``, ``norm``, ``fc_norm``,
attention ``norm``), LayerScale, dropouts and stochastic depth, token / average pooling.

Refused, naming the module: blocks other than timm's pre-norm ``Block`` (``ParallelScalingBlock``,
``ParallelThingsBlock``, ``ResPostBlock``, ...), attention other than timm's ``Attention`` or with
q/k norm or a gate, an MLP with a norm before fc2, and any stray Linear/Conv or unknown module.
The attention-pool head (``global_pool='map'``, the SigLIP towers) is planned by
:mod:`.attention_pool`: its q, kv, proj, matmuls, fc1 and fc2 are sites.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, LayerScale, ParallelScalingBlock, ParallelThingsBlock, VisionTransformer

from ..transforms.rotation_layout import RotationLayout
from .adapter import DROPOUTS, NORMS, Adapter, SitePlan, check_affine_norm, child_paths, timm_pooled_features
from .attention_pool import plan_attention_pool
from .create_args import BOOL, BOOL_OR_NONE, COUNT, NUMBER_OR_NONE, POSITIVE_INT, POSITIVE_NUMBER, SIZE, one_of
from .sites import SiteBuilder
from .vit_rotation import vit_rotation_layout

#: Why the known non-standard blocks are refused.
_BLOCK_REFUSALS = {
    ParallelScalingBlock: "attention and MLP run in parallel from one fused input projection and one fused output "
                          "projection; there is no separate qkv / proj / fc1 / fc2 or attention matmul to quantize",
    ParallelThingsBlock: "parallel attention and MLP branches are not a block layout this adapter knows",
}


class VitAdapter(Adapter):
    family = "timm VisionTransformer"
    model_classes = (VisionTransformer, VisionTransformerDistilled)
    timm_modules = ("timm.models.vision_transformer", "timm.models.deit")
    create_args = dict(
        patch_size=SIZE, embed_dim=POSITIVE_INT, depth=POSITIVE_INT, num_heads=POSITIVE_INT, mlp_ratio=POSITIVE_NUMBER,
        qkv_bias=BOOL, proj_bias=BOOL, qk_norm=BOOL, init_values=NUMBER_OR_NONE, class_token=BOOL, reg_tokens=COUNT,
        no_embed_class=BOOL, global_pool=one_of("", "token", "avg", "avgmax", "max", "map"), pre_norm=BOOL,
        fc_norm=BOOL_OR_NONE, final_norm=BOOL, dynamic_img_size=BOOL, pool_include_prefix=BOOL,
    )

    def create_kwargs(self, model: nn.Module) -> dict:
        blk = model.blocks[0]
        fc1 = blk.mlp.fc1
        return dict(
            patch_size=list(model.patch_embed.patch_size), embed_dim=model.embed_dim, depth=len(model.blocks),
            num_heads=blk.attn.num_heads, mlp_ratio=fc1.out_features / fc1.in_features,
            qkv_bias=blk.attn.qkv.bias is not None, proj_bias=blk.attn.proj.bias is not None,
            qk_norm=not isinstance(blk.attn.q_norm, nn.Identity),
            init_values=None if isinstance(blk.ls1, nn.Identity) else 1e-5,  # any value: gamma comes from the file
            class_token=model.has_class_token, reg_tokens=model.num_reg_tokens, no_embed_class=model.no_embed_class,
            global_pool=model.global_pool, pre_norm=not isinstance(model.norm_pre, nn.Identity),
            # timm puts the final norm either before pooling (``norm``) or after it (``fc_norm``, average
            # pool); ``final_norm=False`` removes both, so either one being present means True.
            fc_norm=not isinstance(model.fc_norm, nn.Identity),
            final_norm=not (isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity)),
            dynamic_img_size=model.dynamic_img_size, pool_include_prefix=getattr(model, "pool_include_prefix", False),
        )

    def plan(self, model: nn.Module, build: SiteBuilder) -> SitePlan:
        p = SitePlan(self.family)
        p.container("")
        attn_pool = getattr(model, "attn_pool", None)
        if attn_pool is not None:  # global_pool='map' (the SigLIP towers)
            plan_attention_pool(p, "attn_pool", attn_pool, build)
        p.patch_embed("patch_embed", model.patch_embed, build)
        for name in ("pos_drop", "patch_drop"):
            if getattr(model, name, None) is not None:
                p.keep_float(name, getattr(model, name), DROPOUTS, "dropout")
        p.keep_float("norm_pre", model.norm_pre, NORMS, "norm")
        p.container("blocks")
        for i, block in enumerate(model.blocks):
            self._plan_block(p, f"blocks.{i}", block, build)
        p.keep_float("norm", model.norm, NORMS, "norm")
        if getattr(model, "fc_norm", None) is not None:
            p.keep_float("fc_norm", model.fc_norm, NORMS, "norm")
        if getattr(model, "head_drop", None) is not None:
            p.keep_float("head_drop", model.head_drop, DROPOUTS, "dropout")
        for name in ("head", "head_dist"):
            head = getattr(model, name, None)
            if head is not None:
                p.classifier(name, head, build)
        return p

    def norm_linear_pairs(self, model: nn.Module) -> list[tuple[str, str]]:
        """norm1 feeds only qkv, norm2 only fc1 (pre-norm blocks; :meth:`plan` refuses other blocks)."""
        pairs = []
        for i, block in enumerate(model.blocks):
            for norm, linear in (("norm1", "attn.qkv"), ("norm2", "mlp.fc1")):
                check_affine_norm(f"blocks.{i}.{norm}", getattr(block, norm), self.family)
                pairs.append((f"blocks.{i}.{norm}", f"blocks.{i}.{linear}"))
        return pairs

    def rotation_layout(self, model: nn.Module, residual: bool) -> RotationLayout:
        return vit_rotation_layout(model, residual)

    def blocks(self, model: nn.Module) -> list[str]:
        """``blocks.i``."""
        return child_paths(model, "blocks")

    def head_features(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The final norm, then what ``forward_head`` pools before its classifier (the class token, or the
        mean of the patch tokens, then ``fc_norm``); distilled DeiT's two heads read the class and the
        distillation token each, so both are kept."""
        read = timm_pooled_features(model)  # refuses an attention pool and no pooling
        if isinstance(model, VisionTransformerDistilled):
            return lambda x: model.norm(x)[:, :2]
        return read

    def _plan_block(self, p: SitePlan, path: str, block: nn.Module, build: SiteBuilder) -> None:
        if type(block) is not Block:
            why = next((why for cls, why in _BLOCK_REFUSALS.items() if isinstance(block, cls)),
                       "only timm's pre-norm Block (norm1, attn, ls1, norm2, mlp, ls2) is a known block layout")
            raise p.refuse(path, block, why)
        p.container(path)
        p.keep_float(f"{path}.norm1", block.norm1, NORMS, "norm")
        p.attention(f"{path}.attn", block.attn, build)
        p.keep_float(f"{path}.norm2", block.norm2, NORMS, "norm")
        p.mlp(f"{path}.mlp", block.mlp, build)
        for name in ("ls1", "ls2"):
            p.keep_float(f"{path}.{name}", getattr(block, name), (LayerScale, nn.Identity), "layer scale")
        for name in ("drop_path1", "drop_path2"):
            p.keep_float(f"{path}.{name}", getattr(block, name), DROPOUTS, "stochastic depth")

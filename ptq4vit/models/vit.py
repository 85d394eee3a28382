"""Adapter for timm's ``VisionTransformer`` family: ViT, DeiT (distilled too), DINOv2-style.

Quantization sites (docs/method.md §1): the patch-embedding conv, every block's qkv and proj,
the two attention matmuls, fc1 and fc2 of the MLP, and the classifier head(s) (``head`` and,
for distilled DeiT, ``head_dist``). Everything else stays float: class / distillation /
register tokens and position embeddings, norms (``norm_pre``, ``norm``, ``fc_norm``,
attention ``norm``), LayerScale, dropouts and stochastic depth, token / average pooling.

Refused, naming the module: blocks other than timm's pre-norm ``Block`` (``ParallelScalingBlock``,
``ParallelThingsBlock``, ``ResPostBlock``, ...), attention other than timm's ``Attention`` or with
q/k norm or a gate, an MLP with a norm before fc2, the attention-pool head
(``global_pool='map'``), and any stray Linear/Conv or unknown module.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import (Attention, Block, LayerScale, ParallelScalingBlock, ParallelThingsBlock,
                                            VisionTransformer)

from ..nn import FloatMatMul, QuantLinear, QuantMatMul
from ..transforms.rotation_layout import RotationLayout
from .adapter import DROPOUTS, NORMS, Adapter, SitePlan, check_affine_norm
from .create_args import BOOL, BOOL_OR_NONE, COUNT, NUMBER_OR_NONE, POSITIVE_INT, POSITIVE_NUMBER, SIZE, one_of
from .sites import SiteBuilder
from .vit_rotation import vit_rotation_layout

#: Why the known non-standard blocks are refused.
_BLOCK_REFUSALS = {
    ParallelScalingBlock: "attention and MLP run in parallel from one fused input projection and one fused output "
                          "projection; there is no separate qkv / proj / fc1 / fc2 or attention matmul to quantize",
    ParallelThingsBlock: "parallel attention and MLP branches are not a block layout this adapter knows",
}


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
        if attn_pool is not None:
            raise p.refuse("attn_pool", attn_pool, "the attention-pool head (global_pool='map') has its own attention "
                                                   "and MLP, which this adapter does not quantize")
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
            if isinstance(head, nn.Identity):  # num_classes=0: features only
                p.keep_float(name, head, (nn.Identity,), "classifier")
            elif head is not None:
                p.site(name, head, nn.Linear, build.classifier)
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

    def _plan_block(self, p: SitePlan, path: str, block: nn.Module, build: SiteBuilder) -> None:
        if type(block) is not Block:
            why = next((why for cls, why in _BLOCK_REFUSALS.items() if isinstance(block, cls)),
                       "only timm's pre-norm Block (norm1, attn, ls1, norm2, mlp, ls2) is a known block layout")
            raise p.refuse(path, block, why)
        p.container(path)
        p.keep_float(f"{path}.norm1", block.norm1, NORMS, "norm")
        self._plan_attention(p, f"{path}.attn", block.attn, build)
        p.keep_float(f"{path}.norm2", block.norm2, NORMS, "norm")
        p.mlp(f"{path}.mlp", block.mlp, build)
        for name in ("ls1", "ls2"):
            p.keep_float(f"{path}.{name}", getattr(block, name), (LayerScale, nn.Identity), "layer scale")
        for name in ("drop_path1", "drop_path2"):
            p.keep_float(f"{path}.{name}", getattr(block, name), DROPOUTS, "stochastic depth")

    def _plan_attention(self, p: SitePlan, path: str, attn: nn.Module, build: SiteBuilder) -> None:
        if type(attn) is not Attention:
            raise p.refuse(path, attn, "only timm's Attention (fused qkv, softmax attention, proj) is a known "
                                       "attention layout; its matmuls would otherwise stay float")
        for name in ("q_norm", "k_norm"):
            if type(getattr(attn, name)) is not nn.Identity:
                raise p.refuse(f"{path}.{name}", getattr(attn, name),
                               "q/k normalisation (qk_norm=True) is not supported: the attention matmul operands "
                               "would be the normalised q and k, which calibration and export do not model")
        if getattr(attn, "gate", None) is not None:
            raise p.refuse(f"{path}.gate", attn.gate, "gated attention is not supported")
        p.replaced_with_parts(path, lambda a: QuantAttention(a, build.qkv_linear(a.qkv), build.linear(a.proj),
                                                            *build.attention_matmuls(a.num_heads, a.qkv)))
        p.part(f"{path}.qkv", attn.qkv, (nn.Linear,), "the qkv projection")
        p.part(f"{path}.proj", attn.proj, (nn.Linear,), "the output projection")
        p.part(f"{path}.q_norm", attn.q_norm, (nn.Identity,), "q norm")
        p.part(f"{path}.k_norm", attn.k_norm, (nn.Identity,), "k norm")
        if getattr(attn, "norm", None) is not None:
            p.part(f"{path}.norm", attn.norm, (nn.Identity, nn.LayerNorm), "the attention output norm")
        p.part(f"{path}.attn_drop", attn.attn_drop, (nn.Dropout,), "attention dropout")
        p.part(f"{path}.proj_drop", attn.proj_drop, (nn.Dropout,), "projection dropout")

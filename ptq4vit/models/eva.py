"""Adapter for timm's ``Eva`` (EVA, EVA-02): rotary position embedding, SwiGLU MLP, sub-LayerNorm.

Quantization sites: the patch-embedding conv, every block's qkv (fused, its q/v biases folded into
the site's bias, :mod:`.qkv_bias`) or q_proj / k_proj / v_proj (``qkv_fused=False``), the two
attention matmuls, proj, the MLP's linear layers (timm ``Mlp``: fc1, fc2; ``SwiGLU``: fc1_g, fc1_x,
fc2; packed ``GluMlp``: fc1, fc2; :mod:`.glu`), the attention-pool head's sites
(``global_pool='map'``, :mod:`.attention_pool`) and the classifier ``head``.

The rotary position embedding is applied, in float, between the qkv product and ``q @ kᵀ``: the
first matmul's operands are the rotated q and k (prefix tokens unrotated), as in the float model.
Stays float: the rotary embedding module ``rope`` (``RotaryEmbeddingCat``: sin/cos tables of the
patch grid) and the rotation it applies, class / register tokens and position embedding, norms
(``norm_pre``, ``norm``, ``fc_norm``, the attention's sub-LayerNorm ``scale_attn_inner``, the MLP's
sub-LayerNorm ``scale_mlp``), LayerScale (``gamma_1``/``gamma_2``, parameters of the block),
dropouts, patch dropout and stochastic depth, pooling.

Refused, naming the module: post-norm blocks (``EvaBlockPostNorm``), ``AttentionRope``
(``attn_type='rope'``, grouped-query attention), q/k normalisation, gated attention, rotary
embeddings other than ``RotaryEmbeddingCat`` (mixed, DINOv3, MRoPE: untested here), any stray
Linear/Conv or unknown module. The rotations are laid out in :mod:`.eva_rotation`: the residual and
fc2 rotations apply; ``rotate_heads`` (and so ``rotq`` as a whole) is refused by name with the rotary
embedding on, which a per-head rotation of q and k does not commute with.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from timm.layers import Mlp, PatchDropout, RotaryEmbeddingCat, apply_rot_embed_cat
try:  # newer timm builds Eva's patch dropout as this class (it also returns the kept indices)
    from timm.layers import PatchDropoutWithIndices
except ImportError:  # timm 1.0.3, the floor, builds it as PatchDropout
    PatchDropoutWithIndices = PatchDropout
from timm.models.eva import Eva, EvaAttention, EvaBlock

from ..nn import FloatMatMul, QuantLinear, QuantMatMul
from ..transforms.modules import OnlineRotation
from ..transforms.rotation_layout import RotationLayout
from .adapter import DROPOUTS, NORMS, Adapter, SitePlan, child_paths, timm_pooled_features
from .attention import additive_attention_mask
from .attention_pool import plan_attention_pool
from .eva_rotation import eva_rotation_layout
from .create_args import BOOL, BOOL_OR_NONE, COUNT, NUMBER_OR_NONE, POSITIVE_INT, POSITIVE_NUMBER, SIZE, one_of
from .glu import plan_mlp_or_glu
from .qkv_bias import biased_qkv, check_qkv_bias_layout, has_qkv_bias
from .sites import SiteBuilder


class QuantEvaAttention(nn.Module):
    """Replacement for ``EvaAttention``: q, k, v from one fused site or three; the rotary embedding
    applied in float to q and k; ``q @ kᵀ`` (``* scale`` after it, so unscaled q and k are
    quantized) and ``softmax @ v`` as sites; optional sub-LayerNorm before proj."""

    def __init__(self, attn: nn.Module, qkv: "QuantLinear | None", qkv_split: "tuple[QuantLinear, ...] | None",
                 proj: QuantLinear, matmul1: "QuantMatMul | FloatMatMul", matmul2: "QuantMatMul | FloatMatMul"):
        super().__init__()
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.scale = attn.scale
        self.num_prefix_tokens = attn.num_prefix_tokens
        self.rotate_half = getattr(attn, "rotate_half", False)
        self.qkv = qkv
        if qkv_split is not None:
            self.q_proj, self.k_proj, self.v_proj = qkv_split
        else:
            self.q_proj = self.k_proj = self.v_proj = None
        self.matmul1 = matmul1
        self.attn_drop = attn.attn_drop
        self.matmul2 = matmul2
        self.norm = attn.norm
        self.proj = proj
        self.proj_drop = attn.proj_drop

    def _rotate(self, t: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        npt = self.num_prefix_tokens
        return torch.cat([t[:, :, :npt, :], apply_rot_embed_cat(t[:, :, npt:, :], rope, half=self.rotate_half)], dim=2)

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        if self.qkv is not None:
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (p(x).reshape(B, N, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj,
                                                                                         self.v_proj))
        if rope is not None:
            q, k = self._rotate(q, rope).type_as(v), self._rotate(k, rope).type_as(v)
        attn = self.matmul1(q, k.transpose(-2, -1)) * self.scale
        bias = additive_attention_mask(N, attn, attn_mask, is_causal)
        if bias is not None:
            attn = attn + bias
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.matmul2(attn, v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(self.norm(x)))


class EvaAdapter(Adapter):
    family = "timm Eva"
    model_classes = (Eva,)
    timm_modules = ("timm.models.eva",)
    create_args = dict(
        patch_size=SIZE, embed_dim=POSITIVE_INT, depth=POSITIVE_INT, num_heads=POSITIVE_INT, mlp_ratio=POSITIVE_NUMBER,
        qkv_bias=BOOL, qkv_fused=BOOL, swiglu_mlp=BOOL, scale_mlp=BOOL, scale_attn_inner=BOOL, init_values=NUMBER_OR_NONE,
        class_token=BOOL, num_reg_tokens=COUNT, no_embed_class=BOOL, use_abs_pos_emb=BOOL, use_rot_pos_emb=BOOL,
        ref_feat_shape=SIZE, use_fc_norm=BOOL_OR_NONE, use_pre_transformer_norm=BOOL,
        use_post_transformer_norm=BOOL_OR_NONE, global_pool=one_of("", "avg", "avgmax", "max", "token", "map"),
        dynamic_img_size=BOOL,
    )

    def blocks(self, model: nn.Module) -> list[str]:
        """``blocks.i``."""
        return child_paths(model, "blocks")

    def head_features(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The final norm, then what ``forward_head`` pools before its classifier (timm's convention)."""
        return timm_pooled_features(model)

    def create_kwargs(self, model: nn.Module) -> dict:
        blk = model.blocks[0]
        fused = blk.attn.qkv is not None
        mlp = blk.mlp
        return dict(
            patch_size=list(model.patch_embed.patch_size), embed_dim=model.embed_dim, depth=len(model.blocks),
            num_heads=blk.attn.num_heads, qkv_fused=fused,
            qkv_bias=has_qkv_bias(blk.attn) if fused else blk.attn.q_proj.bias is not None,
            # a rotated model's online rotation sits in the MLP's identity norm slot or after its sub-LayerNorm
            swiglu_mlp=type(mlp) is not Mlp, scale_mlp=not isinstance(mlp.norm, (nn.Identity, OnlineRotation)),
            scale_attn_inner=not isinstance(blk.attn.norm, nn.Identity),
            # any value: gamma comes from the file; a LayerScale folded by the residual rotation stays registered
            # (as None), which a model built with one and rotated again reproduces
            init_values=0.1 if "gamma_1" in blk._parameters else None,
            class_token=model.cls_token is not None, num_reg_tokens=0 if model.reg_token is None else
            model.reg_token.shape[1], no_embed_class=model.no_embed_class, use_abs_pos_emb=model.pos_embed is not None,
            use_rot_pos_emb=model.rope is not None, use_fc_norm=not isinstance(model.fc_norm, nn.Identity),
            use_pre_transformer_norm=not isinstance(model.norm_pre, nn.Identity),
            use_post_transformer_norm=not isinstance(model.norm, nn.Identity), global_pool=model.global_pool,
            dynamic_img_size=model.dynamic_img_size,
            **({"ref_feat_shape": list(model.rope.ref_feat_shape)}
               if getattr(model.rope, "ref_feat_shape", None) is not None else {}),
        )

    def plan(self, model: nn.Module, build: SiteBuilder) -> SitePlan:
        p = SitePlan(self.family)
        p.container("")
        p.patch_embed("patch_embed", model.patch_embed, build)
        p.keep_float("pos_drop", model.pos_drop, DROPOUTS, "dropout")
        if model.patch_drop is not None:
            p.keep_float("patch_drop", model.patch_drop, (PatchDropout, PatchDropoutWithIndices), "patch dropout")
        if model.rope is not None:
            if getattr(model, "rope_mixed", False):
                raise p.refuse("rope", model.rope, "mixed (per-depth learned) rotary embeddings are not supported")
            p.keep_float("rope", model.rope, (RotaryEmbeddingCat,), "rotary position embedding (RotaryEmbeddingCat)")
        p.keep_float("norm_pre", model.norm_pre, NORMS, "norm")
        p.container("blocks")
        for i, block in enumerate(model.blocks):
            self._plan_block(p, f"blocks.{i}", block, build)
        p.keep_float("norm", model.norm, NORMS, "norm")
        if model.attn_pool is not None:
            plan_attention_pool(p, "attn_pool", model.attn_pool, build)
        p.keep_float("fc_norm", model.fc_norm, NORMS, "norm")
        p.keep_float("head_drop", model.head_drop, DROPOUTS, "dropout")
        p.classifier("head", model.head, build)
        return p

    def rotation_layout(self, model: nn.Module, residual: bool) -> RotationLayout:
        return eva_rotation_layout(model, residual)

    def _plan_block(self, p: SitePlan, path: str, block: nn.Module, build: SiteBuilder) -> None:
        if type(block) is not EvaBlock:
            raise p.refuse(path, block, "only timm's pre-norm EvaBlock is a known block layout (use_post_norm=True "
                                        "blocks normalise after the residual branch)")
        p.pre_norm_block(path, block, lambda q, attn: self._plan_attention(p, q, attn, build),
                         lambda q, mlp: plan_mlp_or_glu(p, q, mlp, build))

    def _plan_attention(self, p: SitePlan, path: str, attn: nn.Module, build: SiteBuilder) -> None:
        if type(attn) is not EvaAttention:
            raise p.refuse(path, attn, "only timm's EvaAttention is a known attention layout (attn_type='rope' "
                                       "attention is not); its matmuls would otherwise stay float")
        p.refuse_qk_norm_and_gate(path, attn)
        if attn.qkv is not None:
            check_qkv_bias_layout(p, path, attn)
            p.replaced_with_parts(path, lambda a: QuantEvaAttention(
                a, build.qkv_linear(biased_qkv(a)), None, build.linear(a.proj),
                *build.attention_matmuls(a.num_heads, a.qkv)))
            p.part(f"{path}.qkv", attn.qkv, (nn.Linear,), "the qkv projection")
        else:
            p.replaced_with_parts(path, lambda a: QuantEvaAttention(
                a, None, tuple(build.normed_linear(lin) for lin in (a.q_proj, a.k_proj, a.v_proj)),
                build.linear(a.proj), *build.attention_matmuls(a.num_heads, a.q_proj)))
            for name in ("q_proj", "k_proj", "v_proj"):
                p.part(f"{path}.{name}", getattr(attn, name), (nn.Linear,), f"the {name[0]} projection")
        p.part(f"{path}.q_norm", attn.q_norm, (nn.Identity,), "q norm")
        p.part(f"{path}.k_norm", attn.k_norm, (nn.Identity,), "k norm")
        p.part(f"{path}.attn_drop", attn.attn_drop, (nn.Dropout,), "attention dropout")
        p.part(f"{path}.norm", attn.norm, NORMS, "the attention's sub-LayerNorm (scale_attn_inner)")
        p.part(f"{path}.proj", attn.proj, (nn.Linear,), "the output projection")
        p.part(f"{path}.proj_drop", attn.proj_drop, (nn.Dropout,), "projection dropout")

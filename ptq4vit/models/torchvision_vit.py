"""Adapter for torchvision's ``VisionTransformer`` (``vit_b_16``, ``vit_b_32``, ``vit_l_16``, ``vit_l_32``,
``vit_h_14``), whose encoder blocks use ``nn.MultiheadAttention``.

Quantization sites (docs/method.md §1): the patch-embedding conv ``conv_proj``; in every block the
q/k/v projection (``nn.MultiheadAttention``'s packed ``in_proj_weight``, rows q, k, v as in timm's
fused qkv), the two attention matmuls and ``out_proj``; the MLP's two linear layers; the
classifier ``heads.head`` (and ``heads.pre_logits`` with ``representation_size``). Stays float:
the class token and position embedding, the LayerNorms, dropouts, the ``Tanh`` of the
representation layer.

Refused, naming the module: the convolutional stem (``conv_stem_configs``), attention with
``add_bias_kv``, ``add_zero_attn``, separate q/k/v weights or ``batch_first=False``, any other
block, MLP or head layout, and any stray Linear/Conv or unknown module.

A torchvision model has no timm name: its checkpoints record ``torchvision_VisionTransformer`` and
the constructor arguments, and ``load`` rebuilds it with ``torchvision.models.VisionTransformer``
(never a builder with weights: nothing is downloaded or read from a file).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torchvision.models.vision_transformer import Encoder, EncoderBlock, MLPBlock, VisionTransformer

from ..errors import UnsupportedModelError, UserError
from ..nn import FloatMatMul, QuantLinear, QuantMatMul
from ..transforms.modules import OnlineRotation
from ..transforms.rotation_layout import (AttentionHeads, BlockRotation, NormReaders, OnlineSlot, ResidualBranch,
                                          ResidualStream, RotationLayout)
from .adapter import ACTIVATIONS, DROPOUTS, NORMS, Adapter, SitePlan, check_affine_norm, child_paths
from .create_args import POSITIVE_INT, PROBABILITY, ArgKind
from .sites import SiteBuilder

#: The model name a torchvision ViT's checkpoint records (a torchvision model carries no timm name).
TORCHVISION_VIT = "torchvision_VisionTransformer"
#: torchvision's builders of this class, which ``create_model`` also takes (always with ``weights=None``).
VIT_BUILDERS = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")

POSITIVE_INT_OR_NONE = ArgKind("a positive integer or null", lambda v: v is None or POSITIVE_INT.accepts(v))


def in_projection(mha: nn.MultiheadAttention) -> nn.Linear:
    """An ``nn.Linear`` holding ``mha``'s packed q/k/v projection: the very ``in_proj_weight`` and
    ``in_proj_bias`` Parameters, so that what is folded into it is folded into ``mha``."""
    lin = nn.Linear(mha.embed_dim, 3 * mha.embed_dim, bias=mha.in_proj_bias is not None, device="meta")
    lin.weight = mha.in_proj_weight
    if mha.in_proj_bias is not None:
        lin.bias = mha.in_proj_bias
    return lin


class QuantMultiheadAttention(nn.Module):
    """Replacement for a self-attention ``nn.MultiheadAttention`` (``batch_first=True``), called as
    torchvision's blocks call it: ``(x, x, x, need_weights=False)``, returning ``(output, weights)``.

    q/k/v projection (``qkv``), ``out_proj`` and the two matmuls are sites. Computes what the
    module computes in eval mode, in timm's op order: ``* scale`` after ``q @ kᵀ`` so the unscaled q
    and k are what gets quantized (docs/method.md §1). PyTorch's own eval path (its fused kernel or
    ``scaled_dot_product_attention``) orders the float ops differently, so with quantization off the
    outputs agree to float32 rounding, not bit for bit (tests/test_families_torchvision.py).
    """

    def __init__(self, mha: nn.MultiheadAttention, qkv: QuantLinear, out_proj: QuantLinear,
                 matmul1: "QuantMatMul | FloatMatMul", matmul2: "QuantMatMul | FloatMatMul"):
        super().__init__()
        self.num_heads = mha.num_heads
        self.head_dim = mha.head_dim
        self.embed_dim = mha.embed_dim
        self.scale = mha.head_dim ** -0.5
        self.qkv = qkv
        self.matmul1 = matmul1
        self.attn_drop = nn.Dropout(mha.dropout)
        self.matmul2 = matmul2
        self.out_proj = out_proj

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if key is not query or value is not query:
            raise UserError("the quantized nn.MultiheadAttention computes self-attention only (query, key and value "
                            "the same tensor)")
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise UserError("the quantized nn.MultiheadAttention takes no attention masks (torchvision's ViT passes none)")
        B, N, _ = query.shape
        qkv = self.qkv(query).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = self.attn_drop((self.matmul1(q, k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        x = self.matmul2(attn, v).transpose(1, 2).reshape(B, N, self.embed_dim)
        weights = (attn.mean(dim=1) if average_attn_weights else attn) if need_weights else None
        return self.out_proj(x), weights


def plan_multihead_attention(p: SitePlan, path: str, mha: nn.Module, build: SiteBuilder) -> None:
    """A self-attention ``nn.MultiheadAttention`` with packed q/k/v weights becomes :class:`QuantMultiheadAttention`."""
    if type(mha) is not nn.MultiheadAttention:
        raise p.refuse(path, mha, "only nn.MultiheadAttention is a known attention layout here; its matmuls would "
                                  "otherwise stay float")
    if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
        raise p.refuse(path, mha, "separate q/k/v weights (kdim/vdim other than embed_dim) are not supported")
    if mha.bias_k is not None or mha.add_zero_attn:
        raise p.refuse(path, mha, "add_bias_kv / add_zero_attn add key/value positions that calibration and export "
                                  "do not model")
    if not mha.batch_first:
        raise p.refuse(path, mha, "batch_first=False (sequence-first inputs) is not supported")
    p.replaced_with_parts(path, lambda a: QuantMultiheadAttention(
        a, build.qkv_linear(in_projection(a)), build.linear(a.out_proj), *build.attention_matmuls(a.num_heads, a.out_proj)))
    p.part(f"{path}.out_proj", mha.out_proj, (NonDynamicallyQuantizableLinear,), "the output projection")


def plan_torchvision_mlp(p: SitePlan, path: str, mlp: nn.Module, build: SiteBuilder,
                         fc1: Optional[Callable[[nn.Linear], QuantLinear]] = None) -> None:
    """torchvision's two-layer ``MLP`` (a Sequential: Linear, GELU, Dropout, Linear, Dropout), the second
    Linear's input quantized as a GELU output. The first Dropout is the slot where a rotation of fc2's
    input runs online (an OnlineRotation there after ``rotate_fc2``). ``fc1`` builds the first Linear's
    site (default: a norm's output, ``build.normed_linear``)."""
    layout = (nn.Linear, nn.GELU, nn.Dropout, nn.Linear, nn.Dropout)
    if len(mlp) != len(layout) or not all(type(m) is t or (i == 2 and type(m) is OnlineRotation)
                                           for i, (m, t) in enumerate(zip(mlp, layout))):
        raise p.refuse(path, mlp, "only torchvision's two-layer MLP (Linear, GELU, Dropout, Linear, Dropout) is a "
                                  "known MLP layout")
    p.container(path)
    p.site(f"{path}.0", mlp[0], nn.Linear, fc1 or build.normed_linear)
    p.keep_float(f"{path}.1", mlp[1], ACTIVATIONS, "MLP activation")
    p.keep_float(f"{path}.2", mlp[2], (*DROPOUTS, OnlineRotation), "dropout (or online rotation)")
    p.site(f"{path}.3", mlp[3], nn.Linear, build.post_gelu_linear)
    p.keep_float(f"{path}.4", mlp[4], DROPOUTS, "dropout")


class TorchvisionVitAdapter(Adapter):
    family = "torchvision VisionTransformer"
    model_classes = (VisionTransformer,)
    architectures = (TORCHVISION_VIT, *VIT_BUILDERS)
    create_args = dict(
        image_size=POSITIVE_INT, patch_size=POSITIVE_INT, num_layers=POSITIVE_INT, num_heads=POSITIVE_INT,
        hidden_dim=POSITIVE_INT, mlp_dim=POSITIVE_INT, dropout=PROBABILITY, attention_dropout=PROBABILITY,
        representation_size=POSITIVE_INT_OR_NONE,
    )

    def model_name(self, model: nn.Module) -> str:
        return TORCHVISION_VIT

    def blocks(self, model: nn.Module) -> list[str]:
        """``encoder.layers.encoder_layer_i``."""
        return child_paths(model, "encoder.layers")

    def head_features(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The encoder's final norm of the class token (what ``heads`` reads)."""
        if hasattr(model.heads, "pre_logits"):
            raise UnsupportedModelError(f"reconstruction.last_unit='features' is not supported for a "
                                        f"{type(model).__name__} with representation_size: its heads.pre_logits "
                                        f"is a quantization site that no unit learns (use last_unit='output')")
        return lambda x: model.encoder.ln(x)[:, 0]

    def create_model(self, name: str, **kwargs) -> nn.Module:
        """``torchvision.models.VisionTransformer(**kwargs)``, or a builder's architecture (never its weights)."""
        if name == TORCHVISION_VIT:
            return VisionTransformer(**kwargs)
        import torchvision.models

        return torchvision.models.get_model(name, weights=None, **kwargs)

    def common_create_kwargs(self, model: nn.Module) -> dict:
        return {"num_classes": model.num_classes}

    def create_kwargs(self, model: nn.Module) -> dict:
        block = model.encoder.layers[0]
        return dict(image_size=model.image_size, patch_size=model.patch_size, num_layers=len(model.encoder.layers),
                    num_heads=block.num_heads, hidden_dim=model.hidden_dim, mlp_dim=model.mlp_dim,
                    dropout=model.dropout, attention_dropout=model.attention_dropout,
                    representation_size=model.representation_size)

    def check_image_size(self, model: nn.Module, height: int, width: int, what: str = "images") -> None:
        if (height, width) != (model.image_size, model.image_size):
            raise UserError(f"{what} are {height}x{width} but the model takes {model.image_size}x{model.image_size} images")

    def plan(self, model: nn.Module, build: SiteBuilder) -> SitePlan:
        p = SitePlan(self.family)
        p.container("")
        if type(model.conv_proj) is not nn.Conv2d:
            raise p.refuse("conv_proj", model.conv_proj, "the convolutional stem (conv_stem_configs) is not supported: "
                                                         "only one patch-embedding Conv2d is a known patch embedding")
        p.site("conv_proj", model.conv_proj, nn.Conv2d, build.patch_conv)
        encoder = model.encoder
        if type(encoder) is not Encoder:
            raise p.refuse("encoder", encoder, "only torchvision's Encoder is a known encoder layout")
        p.container("encoder")
        p.keep_float("encoder.dropout", encoder.dropout, DROPOUTS, "dropout")
        p.container("encoder.layers")
        for name, block in encoder.layers.named_children():
            self._plan_block(p, f"encoder.layers.{name}", block, build)
        p.keep_float("encoder.ln", encoder.ln, NORMS, "norm")
        p.container("heads")
        for name, head in model.heads.named_children():
            if name == "pre_logits":
                p.site("heads.pre_logits", head, nn.Linear, build.normed_linear)
            elif name == "act":
                p.keep_float("heads.act", head, (nn.Tanh,), "representation activation")
            elif name == "head":
                p.site("heads.head", head, nn.Linear, build.classifier)
        return p

    def _plan_block(self, p: SitePlan, path: str, block: nn.Module, build: SiteBuilder) -> None:
        if type(block) is not EncoderBlock:
            raise p.refuse(path, block, "only torchvision's EncoderBlock (ln_1, self_attention, dropout, ln_2, mlp) is "
                                        "a known block layout")
        p.container(path)
        p.keep_float(f"{path}.ln_1", block.ln_1, NORMS, "norm")
        plan_multihead_attention(p, f"{path}.self_attention", block.self_attention, build)
        p.keep_float(f"{path}.dropout", block.dropout, DROPOUTS, "dropout")
        p.keep_float(f"{path}.ln_2", block.ln_2, NORMS, "norm")
        if type(block.mlp) is not MLPBlock:
            raise p.refuse(f"{path}.mlp", block.mlp, "only torchvision's MLPBlock is a known MLP layout")
        plan_torchvision_mlp(p, f"{path}.mlp", block.mlp, build)

    def norm_linear_pairs(self, model: nn.Module) -> list[tuple[str, str]]:
        """ln_1 feeds only the q/k/v projection, ln_2 only the MLP's first layer."""
        pairs = []
        for name, block in model.encoder.layers.named_children():
            path = f"encoder.layers.{name}"
            for norm, linear in (("ln_1", "self_attention.qkv"), ("ln_2", "mlp.0")):
                check_affine_norm(f"{path}.{norm}", getattr(block, norm), self.family)
                pairs.append((f"{path}.{norm}", f"{path}.{linear}"))
        return pairs

    def rotation_layout(self, model: nn.Module, residual: bool) -> RotationLayout:
        """Heads: the packed in-projection and out_proj; fc2's online slot: the MLP's first Dropout
        (identity in eval mode). Residual: conv_proj, the class token and the position embedding write
        the stream; each block's in-projection (ln_1) and first MLP layer (ln_2) read it, out_proj and
        the second MLP layer write it; the final ``encoder.ln`` feeds the head."""
        blocks = []
        for name, block in model.encoder.layers.named_children():
            path = f"encoder.layers.{name}"
            if type(block) is not EncoderBlock or type(block.self_attention) is not nn.MultiheadAttention \
                    or type(block.mlp) is not MLPBlock or type(block.mlp[2]) is not nn.Dropout:
                raise UnsupportedModelError(f"module {path!r}: rotation needs torchvision's EncoderBlock with "
                                            f"nn.MultiheadAttention and MLPBlock")
            mha = block.self_attention
            if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn or not mha.batch_first:
                raise UnsupportedModelError(f"module '{path}.self_attention': rotation needs packed q/k/v weights "
                                            f"without added key/value positions")
            blocks.append(BlockRotation(AttentionHeads(in_projection(mha), mha.out_proj, mha.num_heads, mha.head_dim),
                                        OnlineSlot(block.mlp, "2", block.mlp[3])))
        return RotationLayout(tuple(blocks), self._residual_stream(model) if residual else None)

    def _residual_stream(self, model: nn.Module) -> ResidualStream:
        if type(model.conv_proj) is not nn.Conv2d:
            raise UnsupportedModelError("module 'conv_proj': residual rotation needs one patch-embedding Conv2d")
        branches = []
        for name, block in model.encoder.layers.named_children():
            path = f"encoder.layers.{name}"
            for norm in ("ln_1", "ln_2"):
                if not isinstance(getattr(block, norm), nn.LayerNorm):
                    raise UnsupportedModelError(f"module '{path}.{norm}': residual rotation needs a LayerNorm")
            mha = block.self_attention
            if mha.in_proj_bias is None:  # the norm's shift folds into the reader's bias
                raise UnsupportedModelError(f"module '{path}.self_attention': residual rotation needs the "
                                            f"in-projection bias (bias=True)")
            branches.append(ResidualBranch(NormReaders(block, "ln_1", (in_projection(mha),)), mha.out_proj))
            branches.append(ResidualBranch(NormReaders(block, "ln_2", (block.mlp[0],)), block.mlp[3]))
        if not isinstance(model.encoder.ln, nn.LayerNorm):
            raise UnsupportedModelError("module 'encoder.ln': residual rotation needs a LayerNorm")
        first_head = model.heads[0]
        return ResidualStream(width=model.hidden_dim, input_convs=(model.conv_proj,),
                              added_tensors=(model.class_token, model.encoder.pos_embedding), branches=tuple(branches),
                              final=NormReaders(model.encoder, "ln", (first_head,)))

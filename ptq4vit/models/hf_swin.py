"""Adapter for Hugging Face ``transformers``' Swin (``SwinForImageClassification`` and the bare ``SwinModel``).

``transformers`` is optional: the classes are named by module path (ptq4vit imports without it) and
transformers is imported only once a model of it is planned or rebuilt.

Quantization sites (docs/method.md §1), as in timm's Swin: the patch-embedding conv, every layer's
q/k/v projections fused into one ``qkv`` site (:mod:`.hf_attention`), the two window-attention matmuls,
the output projection, fc1 and fc2, each patch merging's ``reduction`` and the classifier. Stays float:
the relative position bias (its table and index, ``attention.relative_position_bias``) and the shift
mask, added to the scores after the first matmul; the absolute position embedding (if any), layer
norms, dropouts, stochastic depth and the average pooler.

Refused by name: ``SwinForMaskedImageModeling``, ``SwinBackbone`` and every other class (not
registered), a mask token (``use_mask_token=True``), any other layer / attention / MLP class, a stray
Linear or Conv, and ``reparam_ln`` (no layout is described for it here). The rotations (``rotq``) fold
into the q/k/v layers and the stages' streams (:mod:`.hf_swin_rotation`); what they leave is planned too:
the embeddings' norm as a ``RotatedLayerNorm``, affine-free norms, the online rotation after the MLP's
activation (the MLP is planned as the ViT-layout families plan theirs).

The quantized model returns one tensor: the classifier's ``logits``, the backbone's ``pooler_output``
(``last_hidden_state`` without a pooler). A checkpoint rebuilds the model from a ``SwinConfig`` with the
architecture keys of ``create_args`` only (never ``from_pretrained``, a hub name, a file or remote code).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..transforms.modules import RotatedLayerNorm
from ..transforms.rotation_layout import RotationLayout
from .adapter import DROPOUTS, NORMS, Adapter, SitePlan
from .create_args import BOOL, POSITIVE_INT, POSITIVE_INTS, POSITIVE_NUMBER, SIZE, ArgKind
from .hf_attention import QuantHFAttention, fused_qkv
from .hf_output import TensorOutputPlan
from .hf_swin_rotation import hf_swin_rotation_layout
from .hf_vit import HIDDEN_ACTS, HFVitAdapter, HFVitFamily
from .sites import SiteBuilder

SWIN = HFVitFamily(
    "Swin", "transformers.models.swin.modeling_swin", "SwinConfig", "Swin", "encoder.layers",
    ("layernorm_before", "layernorm_after"), dropouts=("dropout", "drop_path"),
    models={"SwinForImageClassification": ("swin", ("classifier",)), "SwinModel": ("", ())},
    config_args=dict(patch_size=SIZE, embed_dim=POSITIVE_INT, depths=POSITIVE_INTS, num_heads=POSITIVE_INTS,
                     window_size=POSITIVE_INT, mlp_ratio=POSITIVE_NUMBER, qkv_bias=BOOL, hidden_act=HIDDEN_ACTS,
                     use_absolute_embeddings=BOOL, layer_norm_eps=POSITIVE_NUMBER, add_pooling_layer=BOOL,
                     drop_path_rate=ArgKind("a number in [0, 1)", lambda v: isinstance(v, (int, float))
                                            and not isinstance(v, bool) and 0 <= v < 1)))


class QuantHFSwinAttention(QuantHFAttention):
    """Replacement for ``transformers``' ``SwinAttention``: the eager formula, ``softmax(q kᵀ · scaling +
    (relative position bias + shift mask)) v``, with the bias module kept float and the mask expanded over
    the batch as transformers expands it (the same float ops in the same order)."""

    def __init__(self, attn: nn.Module, *args, **kwargs):
        super().__init__(attn, *args, **kwargs)
        self.relative_position_bias = attn.relative_position_bias

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs) -> tuple[torch.Tensor, None]:
        B, N, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.relative_position_bias()
        if attention_mask is not None:  # (windows, n, n) -> (batch x windows, 1, n, n)
            windows = attention_mask.shape[0]
            mask = attention_mask.unsqueeze(1).unsqueeze(0).expand(B // windows, -1, -1, -1, -1).reshape(-1, 1, N, N)
            bias = bias + mask
        attn = self.matmul1(q, k.transpose(-2, -1)) * self.scaling + bias
        attn = self.attn_drop(attn.softmax(dim=-1, dtype=torch.float32).to(q.dtype))
        x = self.matmul2(attn, v).transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return getattr(self, self.proj_name)(x), None


class SwinSitePlan(TensorOutputPlan):
    """Also settles each layer's window and shift for the grid it was built for, as its first forward at the
    model's image size does (``set_shift_and_window_size``: a layer whose grid is no larger than a window
    attends to the whole grid, unshifted). The quantized model and one rebuilt from its checkpoint then
    carry the same layer settings whether or not they have run yet."""

    def __init__(self, family: str, output: str, layers: list[nn.Module]):
        super().__init__(family, output)
        self.layers = layers

    def apply(self, model: nn.Module) -> None:
        super().apply(model)
        for layer in self.layers:
            layer.set_shift_and_window_size(layer.input_resolution)


class HFSwinAdapter(HFVitAdapter):
    """``SwinForImageClassification`` and ``SwinModel``: rebuilt from a ``SwinConfig`` as the ViT-layout
    families are (:class:`HFVitAdapter`), planned stage by stage."""

    def __init__(self):
        super().__init__(SWIN)

    def blocks(self, model: nn.Module) -> list[str]:
        # its layers take the grid's size and return tuples (hidden states and more): none can be replayed alone
        return Adapter.blocks(self, model)

    def create_model(self, name: str, **kwargs) -> nn.Module:
        # SwinConfig takes its depths and heads as lists (a checkpoint's JSON lists arrive as tuples)
        return super().create_model(name, **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()})

    def plan(self, model: nn.Module, build: SiteBuilder) -> SitePlan:
        backbone_attr, heads = self.spec.models[type(model).__name__]
        p = SwinSitePlan(self.family, self.output_field(model),
                         [m for m in model.modules() if type(m).__name__ == "SwinLayer"])
        prefix, backbone = self._open_backbone(p, model, backbone_attr, "SwinModel")
        self._plan_swin_embeddings(p, f"{prefix}embeddings", backbone.embeddings, build)
        self._check_class(p, f"{prefix}encoder", backbone.encoder, "SwinEncoder")
        p.container(f"{prefix}encoder")
        p.container(f"{prefix}encoder.layers")
        for i, stage in enumerate(backbone.encoder.layers):
            self._plan_stage(p, f"{prefix}encoder.layers.{i}", stage, build)
        p.keep_float(f"{prefix}layernorm", backbone.layernorm, NORMS, "norm")
        if backbone.pooler is not None:
            p.keep_float(f"{prefix}pooler", backbone.pooler, (nn.AdaptiveAvgPool1d,), "pooler")
        for head in heads:
            p.classifier(head, getattr(model, head), build)  # Identity with num_labels=0
        return p

    def norm_linear_pairs(self, model: nn.Module) -> list[tuple[str, str]]:
        return Adapter.norm_linear_pairs(self, model)  # refused: not described for Swin

    def rotation_layout(self, model: nn.Module, residual: bool) -> RotationLayout:
        return hf_swin_rotation_layout(self.spec, model, residual)

    def _plan_swin_embeddings(self, p: SitePlan, path: str, emb: nn.Module, build: SiteBuilder) -> None:
        self._check_class(p, path, emb, "SwinEmbeddings")
        if emb.mask_token is not None:
            raise p.refuse(path, emb, "a mask token (use_mask_token=True, masked image modelling) is not supported")
        p.container(path)
        self._check_class(p, f"{path}.patch_embeddings", emb.patch_embeddings, "SwinPatchEmbeddings")
        p.container(f"{path}.patch_embeddings")
        p.site(f"{path}.patch_embeddings.projection", emb.patch_embeddings.projection, nn.Conv2d, build.patch_conv)
        p.keep_float(f"{path}.norm", emb.norm, (*NORMS, RotatedLayerNorm), "norm")  # rotated: it writes the stream
        p.keep_float(f"{path}.dropout", emb.dropout, DROPOUTS, "dropout")

    def _plan_stage(self, p: SitePlan, path: str, stage: nn.Module, build: SiteBuilder) -> None:
        self._check_class(p, path, stage, "SwinStage")
        p.container(path)
        p.container(f"{path}.blocks")
        for j, layer in enumerate(stage.blocks):
            self._plan_layer(p, f"{path}.blocks.{j}", layer, build)
        if stage.downsample is not None:
            self._check_class(p, f"{path}.downsample", stage.downsample, "SwinPatchMerging")
            p.container(f"{path}.downsample")
            p.keep_float(f"{path}.downsample.norm", stage.downsample.norm, NORMS, "norm")
            p.site(f"{path}.downsample.reduction", stage.downsample.reduction, nn.Linear, build.linear)

    def _plan_attention(self, p: SitePlan, path: str, attn: nn.Module, build: SiteBuilder) -> None:
        self._check_class(p, path, attn, "SwinAttention")
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            p.part(f"{path}.{name}", getattr(attn, name), (nn.Linear,), f"the {name} projection")
        if len({attn.q_proj.bias is None, attn.k_proj.bias is None, attn.v_proj.bias is None}) != 1:
            raise p.refuse(path, attn, "q, k and v projections must all have a bias or all have none (they are "
                                       "fused into one qkv site)")
        bias = attn.relative_position_bias
        self._check_class(p, f"{path}.relative_position_bias", bias, "SwinRelativePositionBias")
        p.part(f"{path}.relative_position_bias", bias, (type(bias),), "the float relative position bias")
        p.replaced_with_parts(path, lambda a: QuantHFSwinAttention(
            a, build.qkv_linear(fused_qkv(a.q_proj, a.k_proj, a.v_proj)), build.linear(a.o_proj), "o_proj",
            *build.attention_matmuls(a.num_attention_heads, a.q_proj)))

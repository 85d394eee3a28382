"""Adapter for Hugging Face ``transformers``' CLIP vision tower: ``CLIPVisionModel`` (the pooled,
post-normed class token) and ``CLIPVisionModelWithProjection`` (the image embedding).

Quantization sites (docs/method.md §1): the patch-embedding conv, every layer's q/k/v fused into one
``qkv`` site (:mod:`.hf_attention`), ``out_proj``, the two attention matmuls, fc1 and fc2
(:mod:`.hf_encoder`), and the ``visual_projection``. Stays float: the class embedding and the
position embedding table (an ``nn.Embedding`` looked up at fixed positions), the LayerNorms
(``pre_layrnorm`` before the first layer, ``post_layernorm`` on the class token), dropouts.
CLIP's QuickGELU takes the post-GELU quantizers (its minimum lies in GELU's negative range, see
:mod:`.hf_encoder`). Refused by name: any other transformers class (``CLIPModel``,
``CLIPForImageClassification``, the text tower), an activation outside GELU's range with the
post-GELU quantizers on, ``reparam_ln``, and the residual rotation of ``CLIPVisionModel`` (its normed
features would come out rotated). The rotations (``rotq``) are laid out in :mod:`.hf_tower_rotation`.
"""
from __future__ import annotations

from torch import nn

from ..transforms.modules import RotatedLayerNorm
from ..transforms.rotation_layout import RotationLayout
from .adapter import Adapter, NORMS, SitePlan
from .create_args import POSITIVE_INT, POSITIVE_NUMBER
from .hf_encoder import plan_encoder_layer
from .hf_output import TensorOutputPlan
from .hf_tower_rotation import clip_rotation_layout
from .hf_vit import HIDDEN_ACTS, HFVitAdapter, HFVitFamily
from .sites import SiteBuilder

CLIP = HFVitFamily("CLIP vision", "transformers.models.clip.modeling_clip", "CLIPVisionConfig", "CLIP", "encoder.layers",
                   ("layer_norm1", "layer_norm2"), proj="out_proj",
                   models={"CLIPVisionModel": ("", ()), "CLIPVisionModelWithProjection": ("vision_model",
                                                                                           ("visual_projection",))},
                   config_args=dict(patch_size=POSITIVE_INT, hidden_size=POSITIVE_INT, intermediate_size=POSITIVE_INT,
                                    num_hidden_layers=POSITIVE_INT, num_attention_heads=POSITIVE_INT,
                                    projection_dim=POSITIVE_INT, hidden_act=HIDDEN_ACTS,
                                    layer_norm_eps=POSITIVE_NUMBER))


class HFClipAdapter(HFVitAdapter):
    """CLIP's vision tower: rebuilt and size-checked as the ViT-layout families are, planned here."""

    def __init__(self):
        super().__init__(CLIP)

    def plan(self, model: nn.Module, build: SiteBuilder) -> SitePlan:
        backbone_attr, heads = self.spec.models[type(model).__name__]
        p = TensorOutputPlan(self.family, self.output_field(model))
        prefix, tower = self._open_backbone(p, model, backbone_attr, "CLIPVisionModel")
        emb = tower.embeddings
        self._check_class(p, f"{prefix}embeddings", emb, "CLIPVisionEmbeddings")
        p.container(f"{prefix}embeddings")
        p.site(f"{prefix}embeddings.patch_embedding", emb.patch_embedding, nn.Conv2d, build.patch_conv)
        p.keep_float(f"{prefix}embeddings.position_embedding", emb.position_embedding, (nn.Embedding,),
                     "position embedding table")
        # a RotatedLayerNorm once the residual rotation folded into it: its output is the stream
        p.keep_float(f"{prefix}pre_layrnorm", tower.pre_layrnorm, (*NORMS, RotatedLayerNorm), "norm")
        self._check_class(p, f"{prefix}encoder", tower.encoder, "CLIPEncoder")
        p.container(f"{prefix}encoder")
        p.container(f"{prefix}encoder.layers")
        for i, layer in enumerate(tower.encoder.layers):
            plan_encoder_layer(p, f"{prefix}encoder.layers.{i}", layer, build, self.spec.module, "CLIP")
        p.keep_float(f"{prefix}post_layernorm", tower.post_layernorm, NORMS, "norm")
        for head in heads:  # the image projection reads the post-normed class token
            p.site(head, getattr(model, head), nn.Linear, build.classifier)
        return p

    def output_field(self, model: nn.Module) -> str:
        return "image_embeds" if self.spec.models[type(model).__name__][1] else "pooler_output"

    def norm_linear_pairs(self, model: nn.Module) -> list[tuple[str, str]]:
        return Adapter.norm_linear_pairs(self, model)

    def rotation_layout(self, model: nn.Module, residual: bool) -> RotationLayout:
        return clip_rotation_layout(self.spec, model, residual)

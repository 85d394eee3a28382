"""Adapter for Hugging Face ``transformers``' SigLIP vision tower, ``SiglipVisionModel`` (the output of
its attention-pool head, the image embedding).

Quantization sites (docs/method.md §1): the patch-embedding conv, every layer's q/k/v fused into one
``qkv`` site (:mod:`.hf_attention`), ``out_proj``, the two attention matmuls, fc1 and fc2
(:mod:`.hf_encoder`), and in the attention-pool head (:mod:`.mha_pool`) the probe's q projection,
the k/v projection, ``out_proj``, the two pooling matmuls, fc1 and fc2. Stays float: the position
embedding table (an ``nn.Embedding`` looked up at fixed positions), the LayerNorms, the probe.
SigLIP's ``gelu_pytorch_tanh`` takes the post-GELU quantizers (see :mod:`.hf_encoder`). Refused by
name: any other transformers class (``SiglipModel``, ``SiglipForImageClassification``, SigLIP 2),
an activation outside GELU's range with the post-GELU quantizers on, a tower without its head
(``vision_use_head=False``: it returns tokens), a pooling attention with added key/value
positions, and ``reparam_ln``. The rotations (``rotq``) are laid out in :mod:`.hf_tower_rotation` (the
head's own attention output and MLP are not rotated).
"""
from __future__ import annotations

from torch import nn

from ..transforms.rotation_layout import RotationLayout
from .adapter import Adapter, NORMS, SitePlan
from .create_args import BOOL, POSITIVE_INT, POSITIVE_NUMBER
from .hf_encoder import plan_encoder_layer, plan_hf_mlp
from .hf_output import TensorOutputPlan
from .hf_tower_rotation import siglip_rotation_layout
from .hf_vit import HIDDEN_ACTS, HFVitAdapter, HFVitFamily
from .mha_pool import plan_probe_pool
from .sites import SiteBuilder

SIGLIP = HFVitFamily("SigLIP vision", "transformers.models.siglip.modeling_siglip", "SiglipVisionConfig", "Siglip",
                     "encoder.layers", ("layer_norm1", "layer_norm2"), proj="out_proj",
                     models={"SiglipVisionModel": ("", ())},
                     config_args=dict(patch_size=POSITIVE_INT, hidden_size=POSITIVE_INT,
                                      intermediate_size=POSITIVE_INT, num_hidden_layers=POSITIVE_INT,
                                      num_attention_heads=POSITIVE_INT, hidden_act=HIDDEN_ACTS,
                                      layer_norm_eps=POSITIVE_NUMBER, vision_use_head=BOOL))


class HFSiglipAdapter(HFVitAdapter):
    """SigLIP's vision tower: rebuilt and size-checked as the ViT-layout families are, planned here."""

    def __init__(self):
        super().__init__(SIGLIP)

    def plan(self, model: nn.Module, build: SiteBuilder) -> SitePlan:
        p = TensorOutputPlan(self.family, self.output_field(model))
        self._open_backbone(p, model, "", "")  # the tower is the model
        emb = model.embeddings
        self._check_class(p, "embeddings", emb, "SiglipVisionEmbeddings")
        p.container("embeddings")
        p.site("embeddings.patch_embedding", emb.patch_embedding, nn.Conv2d, build.patch_conv)
        p.keep_float("embeddings.position_embedding", emb.position_embedding, (nn.Embedding,),
                     "position embedding table")
        self._check_class(p, "encoder", model.encoder, "SiglipEncoder")
        p.container("encoder")
        p.container("encoder.layers")
        for i, layer in enumerate(model.encoder.layers):
            plan_encoder_layer(p, f"encoder.layers.{i}", layer, build, self.spec.module, "Siglip")
        p.keep_float("post_layernorm", model.post_layernorm, NORMS, "norm")
        head = getattr(model, "head", None)
        if head is None:
            raise p.refuse("", model, "vision_use_head=False returns the tokens, not one embedding per image: "
                                      "calibration and evaluation read one output vector per image")
        self._check_class(p, "head", head, "SiglipMultiheadAttentionPoolingHead")
        self._check_class(p, "head.mlp", head.mlp, "SiglipMLP")
        plan_probe_pool(p, "head", head, build, plan_hf_mlp)
        return p

    def output_field(self, model: nn.Module) -> str:
        return "pooler_output"

    def norm_linear_pairs(self, model: nn.Module) -> list[tuple[str, str]]:
        return Adapter.norm_linear_pairs(self, model)

    def rotation_layout(self, model: nn.Module, residual: bool) -> RotationLayout:
        return siglip_rotation_layout(self.spec, model, residual)

"""A timm DINOv2-style ViT state dict as a Hugging Face ``Dinov2ForImageClassification`` one.

The same weights through another door: the shared ViT-S/14 CIFAR-10 classifier (timm's
``vit_small_patch14_dinov2``, class token, no register tokens, LayerScale, a linear head on the
class token) loaded into ``transformers``' DINOv2 classes, with no download. The names map one to
one except two places:

* timm's fused ``attn.qkv`` (rows: q, k, v) is split into ``q_proj``, ``k_proj`` and ``v_proj``;
* timm's head reads the final-normed class token; ``Dinov2ForImageClassification``'s classifier
  reads the class token concatenated with the mean of the patch tokens, so the head's weight is
  padded with zeros over the second half (those products are exactly zero).
"""
from __future__ import annotations

import torch

from ..errors import UserError

_TOP = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
_BLOCK = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1",
          "mlp.fc2": "mlp.fc2"}
_LAYER_SCALES = {"ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"}


def timm_dinov2_to_hf(sd: dict[str, torch.Tensor], prefix: str = "dinov2.") -> dict[str, torch.Tensor]:
    """``sd`` (a timm ViT with class token, LayerScale and a ``head``) as ``Dinov2ForImageClassification``'s state
    dict (``prefix=""`` and no head for a ``Dinov2Model``). The mask token, unused at inference, is zero.
    UserError naming the first tensor it cannot place."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if key in _TOP:
            out[prefix + _TOP[key]] = t
            continue
        if key.startswith("head.") and prefix:
            if key == "head.weight":
                t = torch.cat([t, torch.zeros_like(t)], dim=1)
            out[f"classifier.{key.partition('.')[2]}"] = t
            continue
        parts = key.split(".")
        if parts[0] != "blocks" or len(parts) < 4:
            raise UserError(f"timm tensor {key!r} has no place in a Hugging Face DINOv2 model")
        layer = f"{prefix}encoder.layer.{parts[1]}."
        rest = ".".join(parts[2:])
        if rest in _LAYER_SCALES:
            out[layer + _LAYER_SCALES[rest]] = t
        elif parts[2:4] == ["attn", "qkv"]:
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                out[f"{layer}attention.{name}.{parts[4]}"] = chunk.clone()
        elif ".".join(parts[2:-1]) in _BLOCK:
            out[layer + _BLOCK[".".join(parts[2:-1])] + "." + parts[-1]] = t
        else:
            raise UserError(f"timm tensor {key!r} has no place in a Hugging Face DINOv2 model")
    width = sd["cls_token"].shape[-1] if "cls_token" in sd else 0
    out[prefix + "embeddings.mask_token"] = torch.zeros(1, width, dtype=sd["cls_token"].dtype if width else None)
    return out

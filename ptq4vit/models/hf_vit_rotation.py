"""Where a rotation finds the residual stream, norms, layer scales, heads and MLPs of a Hugging Face
ViT / DeiT / DINOv2 model (docs/lowbit.md §2), after checking that it has the pre-norm layout the
folding assumes; anything else is refused naming the module.

What differs from timm's ViT: q, k and v are three linear layers (each reads the first norm; the
per-head rotations of q/k and of v are folded into their rows), DINOv2's LayerScale keeps its scale
in ``lambda1``, the MLP has no identity slot before fc2 (the online rotation runs after the
activation), and DINOv2's classifier reads the class token and the mean patch token concatenated
(two normed stream tokens: its input is rotated by ``blockdiag(Q, Q)``).
"""
from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from ..transforms.rotation_layout import (AttentionHeads, BlockRotation, NormReaders, OnlineSlot, ResidualBranch,
                                          ResidualStream, RotationLayout)

#: Tensors of the embeddings added to (or concatenated with, or put in place of) the stream, where the model has them.
_STREAM_TENSORS = ("cls_token", "distillation_token", "mask_token", "position_embeddings")


def _refuse(path: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"module {path!r}: {why}")


def _check_layer(spec, path: str, layer: nn.Module, residual: bool) -> None:
    expected = {"": "Layer", "attention": "Attention", "mlp": "MLP"}
    for child, cls in expected.items():
        module = layer.get_submodule(child) if child else layer
        if type(module) is not spec.cls(f"{spec.prefix}{cls}"):
            where = f"{path}.{child}" if child else path
            raise _refuse(where, f"rotation needs transformers' {spec.prefix}{cls} here, not {type(module).__name__}")
    attn = layer.attention
    if len({attn.q_proj.bias is None, attn.k_proj.bias is None, attn.v_proj.bias is None}) != 1:
        raise _refuse(f"{path}.attention", "rotation needs q, k and v projections that all have a bias or none")
    if not residual:
        return
    for norm in spec.norms:
        if not isinstance(getattr(layer, norm), nn.LayerNorm):
            raise _refuse(f"{path}.{norm}", "residual rotation needs a LayerNorm")
    for name in spec.layer_scales:
        if type(getattr(layer, name)) is not spec.cls(f"{spec.prefix}LayerScale"):
            raise _refuse(f"{path}.{name}", f"residual rotation needs transformers' {spec.prefix}LayerScale")


def hf_vit_rotation_layout(spec, model: nn.Module, residual: bool) -> RotationLayout:
    """The rotation layout of a Hugging Face ViT / DeiT / DINOv2 model of the family ``spec``
    (:class:`~ptq4vit.models.hf_vit.HFVitFamily`; the residual part only with ``residual``)."""
    backbone_attr, heads = spec.models[type(model).__name__]
    prefix = f"{backbone_attr}." if backbone_attr else ""
    backbone = getattr(model, backbone_attr) if backbone_attr else model
    layers = backbone.get_submodule(spec.layers)
    for i, layer in enumerate(layers):
        _check_layer(spec, f"{prefix}{spec.layers}.{i}", layer, residual)
    blocks = tuple(BlockRotation(AttentionHeads((layer.attention.q_proj, layer.attention.k_proj, layer.attention.v_proj),
                                                getattr(layer.attention, spec.proj),
                                                layer.attention.num_attention_heads, layer.attention.head_dim),
                                 OnlineSlot(layer.mlp, "activation_fn", layer.mlp.fc2, after=True)) for layer in layers)
    if not residual:
        return RotationLayout(blocks)
    return RotationLayout(blocks, _residual_stream(spec, model, prefix, backbone, heads))


def _residual_stream(spec, model: nn.Module, prefix: str, backbone: nn.Module, heads: tuple[str, ...]) -> ResidualStream:
    """Writers: the patch conv, the class / distillation / mask tokens, the position embedding, each layer's
    output projection and fc2 (after its LayerScale); readers: each layer's q/k/v (first norm) and fc1 (second
    norm); the final norm's readers: the classifiers, or a backbone's pooler."""
    emb = backbone.embeddings
    if type(emb.patch_embeddings.projection) is not nn.Conv2d:
        raise _refuse(f"{prefix}embeddings.patch_embeddings.projection", "residual rotation needs a Conv2d")
    if not isinstance(backbone.layernorm, nn.LayerNorm):
        raise _refuse(f"{prefix}layernorm", "residual rotation needs a LayerNorm")
    if heads:
        readers = tuple(getattr(model, h) for h in heads)
        names = heads
    else:
        pooler = getattr(backbone, "pooler", None)
        readers = (pooler.dense,) if pooler is not None and spec.name != "DINOv2" else ()
        names = (f"{prefix}pooler.dense",)
    for name, reader in zip(names, readers):
        if type(reader) is not nn.Linear:
            raise _refuse(name, f"residual rotation needs a Linear classifier to fold the last rotation into, not "
                                f"{type(reader).__name__} (num_labels=0 would return rotated features)")
    if not readers:
        raise UnsupportedModelError(f"model {type(model).__name__} has no classifier or pooler to fold the last "
                                    f"residual rotation into: its features would come out rotated")
    # DINOv2's classifier reads the class token and the mean patch token, concatenated
    tokens = readers[0].in_features // backbone.layernorm.normalized_shape[-1]
    layers = backbone.get_submodule(spec.layers)
    branches = []
    for layer in layers:
        attn, mlp = layer.attention, layer.mlp
        scales = spec.layer_scales or (None, None)
        for norm, readers_, writer, scale in ((spec.norms[0], (attn.q_proj, attn.k_proj, attn.v_proj),
                                               getattr(attn, spec.proj), scales[0]),
                                              (spec.norms[1], (mlp.fc1,), mlp.fc2, scales[1])):
            branches.append(ResidualBranch(NormReaders(layer, norm, readers_), writer, scale, "lambda1"))
    return ResidualStream(
        width=int(model.config.hidden_size), input_convs=(emb.patch_embeddings.projection,),
        added_tensors=tuple(t for t in (getattr(emb, a, None) for a in _STREAM_TENSORS) if t is not None),
        branches=tuple(branches), final=NormReaders(backbone, "layernorm", readers, tokens))

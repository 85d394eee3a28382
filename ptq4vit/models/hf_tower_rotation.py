"""Where a rotation finds the residual stream, norms, heads and MLPs of Hugging Face ``transformers``' CLIP and
SigLIP vision towers (docs/lowbit.md §2), after checking that they have the pre-norm layout the folding
assumes; anything else is refused naming the module.

Both share the encoder layer of :mod:`.hf_encoder` (q, k and v as three linear layers reading ``layer_norm1``,
``out_proj``; ``fc1`` reading ``layer_norm2``, the activation, ``fc2``; no LayerScale): the per-head rotations
fold into the q/k/v rows and ``out_proj``'s columns, fc2's input is rotated online after the activation
(``mlp.activation_fn`` becomes ``Sequential(activation, OnlineRotation)``).

The streams differ at their ends. CLIP's stream is written by ``pre_layrnorm`` (the embeddings before it are
not the stream: that norm's output is, so it becomes a ``RotatedLayerNorm``) and read at the end by
``post_layernorm`` on the class token, whose output ``CLIPVisionModelWithProjection``'s ``visual_projection``
reads (the last rotation folds into it; it gains the bias ``Wβ``). ``CLIPVisionModel`` returns that normed
class token: its residual rotation is refused (the features would come out rotated), the per-head and fc2
rotations apply. SigLIP's stream is written by the patch conv and the position table; ``post_layernorm``'s
output is read by the attention-pool head's key and value projections only (rows ``C..3C`` of its
``nn.MultiheadAttention``'s packed in-projection; the q rows read the learned probe, not the stream). The
head's own attention output, norm and MLP live in the head's output space and are not rotated. A tower
without its head (``vision_use_head=False``) is refused by name, as its planning refuses it.
"""
from __future__ import annotations

import importlib

from torch import nn

from ..errors import UnsupportedModelError
from ..transforms.rotation_layout import (AttentionHeads, BlockRotation, NormReaders, OnlineSlot, PackedRows,
                                          ResidualBranch, ResidualStream, RotationLayout, StreamNorm)


def _refuse(path: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"module {path!r}: {why}")


def _check_layers(module: str, prefix: str, path: str, layers: nn.Module, residual: bool) -> None:
    classes = importlib.import_module(module)
    for i, layer in enumerate(layers):
        where = f"{path}.{i}"
        for child, cls in (("", "EncoderLayer"), ("self_attn", "Attention"), ("mlp", "MLP")):
            m = layer.get_submodule(child) if child else layer
            if type(m) is not getattr(classes, f"{prefix}{cls}"):
                raise _refuse(f"{where}.{child}" if child else where,
                              f"rotation needs transformers' {prefix}{cls} here, not {type(m).__name__}")
        attn = layer.self_attn
        if len({attn.q_proj.bias is None, attn.k_proj.bias is None, attn.v_proj.bias is None}) != 1:
            raise _refuse(f"{where}.self_attn", "rotation needs q, k and v projections that all have a bias or none")
        if residual:
            for norm in ("layer_norm1", "layer_norm2"):
                if not isinstance(getattr(layer, norm), nn.LayerNorm):
                    raise _refuse(f"{where}.{norm}", "residual rotation needs a LayerNorm")


def _blocks(layers: nn.Module) -> tuple[BlockRotation, ...]:
    return tuple(BlockRotation(AttentionHeads((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                                              layer.self_attn.out_proj, layer.self_attn.num_heads,
                                              layer.self_attn.head_dim),
                               OnlineSlot(layer.mlp, "activation_fn", layer.mlp.fc2, after=True)) for layer in layers)


def _branches(layers: nn.Module) -> tuple[ResidualBranch, ...]:
    """Each layer's q/k/v (``layer_norm1``) writing through ``out_proj``, and fc1 (``layer_norm2``) through fc2."""
    branches = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        branches.append(ResidualBranch(NormReaders(layer, "layer_norm1", (attn.q_proj, attn.k_proj, attn.v_proj)),
                                       attn.out_proj))
        branches.append(ResidualBranch(NormReaders(layer, "layer_norm2", (mlp.fc1,)), mlp.fc2))
    return tuple(branches)


def clip_rotation_layout(spec, model: nn.Module, residual: bool) -> RotationLayout:
    """The rotation layout of a CLIP vision tower of the family ``spec`` (the residual part only with ``residual``)."""
    backbone_attr, heads = spec.models[type(model).__name__]
    prefix = f"{backbone_attr}." if backbone_attr else ""
    tower = getattr(model, backbone_attr) if backbone_attr else model
    layers = tower.encoder.layers
    _check_layers(spec.module, spec.prefix, f"{prefix}encoder.layers", layers, residual)
    blocks = _blocks(layers)
    if not residual:
        return RotationLayout(blocks)
    if not heads:
        raise UnsupportedModelError(f"model {type(model).__name__} has no projection to fold the last residual "
                                    f"rotation into: its features (the normed class token) would come out rotated")
    for norm in ("pre_layrnorm", "post_layernorm"):
        if not isinstance(getattr(tower, norm), nn.LayerNorm):
            raise _refuse(f"{prefix}{norm}", "residual rotation needs a LayerNorm")
    projection = getattr(model, heads[0])
    if type(projection) is not nn.Linear:
        raise _refuse(heads[0], f"residual rotation needs a Linear projection to fold the last rotation into, not "
                                f"{type(projection).__name__}")
    return RotationLayout(blocks, ResidualStream(
        width=tower.config.hidden_size, input_convs=(), added_tensors=(), branches=_branches(layers),
        final=NormReaders(tower, "post_layernorm", (projection,)), input_norms=(StreamNorm(tower, "pre_layrnorm"),)))


def siglip_rotation_layout(spec, model: nn.Module, residual: bool) -> RotationLayout:
    """The rotation layout of a SigLIP vision tower of the family ``spec`` (the residual part only with ``residual``)."""
    head = getattr(model, "head", None)
    if head is None:
        raise _refuse("<model>", "vision_use_head=False returns the tokens, not one embedding per image: "
                                 "calibration and evaluation read one output vector per image")
    layers = model.encoder.layers
    _check_layers(spec.module, spec.prefix, "encoder.layers", layers, residual)
    blocks = _blocks(layers)
    if not residual:
        return RotationLayout(blocks)
    emb = model.embeddings
    if type(emb.patch_embedding) is not nn.Conv2d:
        raise _refuse("embeddings.patch_embedding", "residual rotation needs a Conv2d")
    if not isinstance(model.post_layernorm, nn.LayerNorm):
        raise _refuse("post_layernorm", "residual rotation needs a LayerNorm")
    mha = head.attention
    if type(mha) is not nn.MultiheadAttention or not mha._qkv_same_embed_dim or mha.in_proj_bias is None:
        raise _refuse("head.attention", "residual rotation needs nn.MultiheadAttention with a packed, biased "
                                        "in-projection to fold the last rotation into its key and value rows")
    c = mha.embed_dim
    kv = PackedRows(mha, "in_proj_weight", "in_proj_bias", slice(c, 3 * c))
    return RotationLayout(blocks, ResidualStream(
        width=model.config.hidden_size, input_convs=(emb.patch_embedding,),
        added_tensors=(emb.position_embedding.weight,), branches=_branches(layers),
        final=NormReaders(model, "post_layernorm", (kv,))))

"""Where a rotation finds the residual streams, norms, heads and MLPs of a Hugging Face ``transformers`` Swin
(``SwinForImageClassification``, ``SwinModel``; docs/lowbit.md §2), after checking that it has the layout
the folding assumes; anything else is refused naming the module.

The same streams as timm's Swin (:mod:`.swin_rotation`), in transformers' order: a stage's patch merging
comes after its layers (``encoder.layers.<i>.downsample``: its norm reads 4 concatenated tokens of stage
``i``'s stream, its ``reduction`` writes stage ``i+1``'s). Stage 0's stream is the embeddings' LayerNorm
output plus the absolute position embedding where the model has one. q, k and v are three layers (as in
:mod:`.hf_vit_rotation`), the MLP has no identity slot before fc2 (the online rotation runs after the
activation), and the average pooler moves whole tokens into the classifier.

transformers pads a layer's grid to whole windows after ``layernorm_before``; the padded zeros would
become keys and values of qkv's bias, which holds the norm's folded shift after the residual rotation:
every layer's grid must fill whole windows at the model's image size (the only size it takes here).
A bare ``SwinModel`` has no linear layer after its last norm: its features would come out rotated, so
only the residual rotation is refused there.
"""
from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from ..transforms.rotation_layout import (AttentionHeads, BlockRotation, NormReaders, OnlineSlot, ResidualBranch,
                                          ResidualStream, RotationLayout, StreamNorm)


def _refuse(path: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"module {path!r}: {why}")


def _layers(prefix: str, backbone: nn.Module):
    """``(path, layer)`` of every SwinLayer, in model order."""
    for i, stage in enumerate(backbone.encoder.layers):
        for j, layer in enumerate(stage.blocks):
            yield f"{prefix}encoder.layers.{i}.blocks.{j}", layer


def _check_layers(spec, prefix: str, backbone: nn.Module) -> None:
    for path, layer in _layers(prefix, backbone):
        for child, cls in (("", "SwinLayer"), ("attention", "SwinAttention"), ("mlp", "SwinMLP")):
            module = layer.get_submodule(child) if child else layer
            if type(module) is not spec.cls(cls):
                where = f"{path}.{child}" if child else path
                raise _refuse(where, f"rotation needs transformers' {cls} here, not {type(module).__name__}")
        attn = layer.attention
        if len({attn.q_proj.bias is None, attn.k_proj.bias is None, attn.v_proj.bias is None}) != 1:
            raise _refuse(f"{path}.attention", "rotation needs q, k and v projections that all have a bias or none")


def _check_layernorm(path: str, module: nn.Module) -> None:
    if not isinstance(module, nn.LayerNorm):
        raise _refuse(path, "residual rotation needs a LayerNorm")


def _check_residual(spec, model: nn.Module, prefix: str, backbone: nn.Module, heads: tuple[str, ...]) -> None:
    emb = backbone.embeddings
    if type(emb.patch_embeddings.projection) is not nn.Conv2d:
        raise _refuse(f"{prefix}embeddings.patch_embeddings.projection", "residual rotation needs a Conv2d")
    _check_layernorm(f"{prefix}embeddings.norm", emb.norm)
    for i, stage in enumerate(backbone.encoder.layers):
        if stage.downsample is not None:
            if type(stage.downsample) is not spec.cls("SwinPatchMerging"):
                raise _refuse(f"{prefix}encoder.layers.{i}.downsample",
                              "residual rotation needs transformers' SwinPatchMerging")
            _check_layernorm(f"{prefix}encoder.layers.{i}.downsample.norm", stage.downsample.norm)
    for path, layer in _layers(prefix, backbone):
        for norm in ("layernorm_before", "layernorm_after"):
            _check_layernorm(f"{path}.{norm}", getattr(layer, norm))
        (h, w), window = layer.input_resolution, layer.window_size
        window = min(h, w) if min(h, w) <= window else window  # as set_shift_and_window_size clamps it
        if h % window or w % window:
            raise _refuse(path, f"residual rotation needs its {h}x{w} tokens to fill whole {window}x{window} windows "
                                f"(the zeros that pad them would meet layernorm_before's shift folded into q/k/v)")
    _check_layernorm(f"{prefix}layernorm", backbone.layernorm)
    if not heads:
        raise UnsupportedModelError(f"model {type(model).__name__} has no classifier to fold the last residual "
                                    f"rotation into: its features would come out rotated")
    for head in heads:
        if type(getattr(model, head)) is not nn.Linear:
            raise _refuse(head, f"residual rotation needs a Linear classifier to fold the last rotation into, not "
                                f"{type(getattr(model, head)).__name__} (num_labels=0 would return rotated features)")
    if type(backbone.pooler) is not nn.AdaptiveAvgPool1d or backbone.pooler.output_size not in (1, (1,)):
        raise _refuse(f"{prefix}pooler", "residual rotation needs the average pooler, which moves whole tokens")


def _residual_streams(model: nn.Module, backbone: nn.Module, heads: tuple[str, ...]) -> tuple[ResidualStream, ...]:
    """One stream per stage; each ends at its patch merging's norm (4 tokens) or at the final norm and the
    classifier. Writers: the patch conv through the embeddings' norm, the position embedding, each layer's
    o_proj and fc2; readers: q/k/v (layernorm_before) and fc1 (layernorm_after)."""
    emb = backbone.embeddings
    added = (emb.position_embeddings,) if emb.position_embeddings is not None else ()
    entry: dict = dict(input_convs=(), input_norms=(StreamNorm(emb, "norm"),), added_tensors=added)
    width, streams = emb.patch_embeddings.projection.out_channels, []
    for stage in backbone.encoder.layers:
        branches = []
        for layer in stage.blocks:
            attn, mlp = layer.attention, layer.mlp
            branches.append(ResidualBranch(NormReaders(layer, "layernorm_before",
                                                       (attn.q_proj, attn.k_proj, attn.v_proj)), attn.o_proj))
            branches.append(ResidualBranch(NormReaders(layer, "layernorm_after", (mlp.fc1,)), mlp.fc2))
        down = stage.downsample
        if down is None:
            final = NormReaders(backbone, "layernorm", tuple(getattr(model, h) for h in heads))
        else:
            final = NormReaders(down, "norm", (down.reduction,), tokens=4)
        streams.append(ResidualStream(width=width, branches=tuple(branches), final=final, centred=False, **entry))
        if down is not None:
            width = down.reduction.out_features
            entry = dict(input_convs=(), input_linears=(down.reduction,), added_tensors=())
    return tuple(streams)


def hf_swin_rotation_layout(spec, model: nn.Module, residual: bool) -> RotationLayout:
    """The rotation layout of a Hugging Face Swin of the family ``spec`` (the residual streams only with
    ``residual``)."""
    backbone_attr, heads = spec.models[type(model).__name__]
    prefix = f"{backbone_attr}." if backbone_attr else ""
    backbone = getattr(model, backbone_attr) if backbone_attr else model
    _check_layers(spec, prefix, backbone)
    if residual:
        _check_residual(spec, model, prefix, backbone, heads)
    blocks = tuple(BlockRotation(AttentionHeads((layer.attention.q_proj, layer.attention.k_proj, layer.attention.v_proj),
                                                layer.attention.o_proj, layer.attention.num_attention_heads,
                                                layer.attention.head_dim),
                                 OnlineSlot(layer.mlp, "activation_fn", layer.mlp.fc2, after=True))
                   for _, layer in _layers(prefix, backbone))
    return RotationLayout(blocks, _residual_streams(model, backbone, heads) if residual else None)

"""Where a rotation finds the residual streams, norms, heads and MLPs of a torchvision ``SwinTransformer`` v1
(docs/lowbit.md §2), after checking that the model has the layout the folding assumes; anything else is
refused naming the module. V2 (``SwinTransformerBlockV2``) is refused: its blocks are res-post-norm (the
norm sits after the branch, on what is added to the stream, so no reader of a normed stream takes the
rotation) and its cosine attention normalises q and k per head, which a per-head rotation of q/k keeps
but the residual rotation cannot reach.

The same streams as timm's Swin (:mod:`.swin_rotation`): stage 0's stream is the stem's LayerNorm output
(``features.0.2``), each ``PatchMerging`` between two stages reads 4 concatenated tokens of the previous
stream through its norm and writes the next one with its ``reduction``; the final ``norm`` feeds the
``head`` through average pooling (which moves whole tokens). The MLP's first Dropout (an identity in
eval mode) is fc2's online slot.

torchvision pads a feature map to whole windows *after* ``norm1`` and takes any image size. The zeros it
pads with become keys and values of qkv's bias, and the residual rotation folds ``norm1``'s shift into that
bias: exact only where nothing is padded. The quantized window attention of a rotated model therefore
refuses a grid that is not made of whole windows (:class:`~.torchvision_swin.QuantShiftedWindowAttention`).
"""
from __future__ import annotations

from torch import nn
from torchvision.models.swin_transformer import (PatchMerging, ShiftedWindowAttention, SwinTransformerBlock,
                                                 SwinTransformerBlockV2)
from torchvision.ops.misc import MLP, Permute

from ..errors import UnsupportedModelError
from ..transforms.rotation_layout import (AttentionHeads, BlockRotation, NormReaders, OnlineSlot, ResidualBranch,
                                          ResidualStream, RotationLayout, StreamNorm)


def _refuse(path: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"module {path!r}: {why}")


def _stages(model: nn.Module):
    """``(index, module)`` of every entry of ``model.features`` after the stem: stages at odd indices,
    patch mergings at even ones."""
    return list(enumerate(model.features))[1:]


def _blocks(model: nn.Module):
    for i, stage in _stages(model):
        if i % 2 == 1:
            for j, blk in enumerate(stage):
                yield f"features.{i}.{j}", blk


def _check_blocks(model: nn.Module) -> None:
    for path, blk in _blocks(model):
        if type(blk) is SwinTransformerBlockV2:
            raise _refuse(path, "rotation is not supported for Swin V2 blocks: they are res-post-norm (no norm "
                                "output for the residual rotation to fold into) with cosine attention")
        if type(blk) is not SwinTransformerBlock or type(blk.attn) is not ShiftedWindowAttention \
                or type(blk.mlp) is not MLP or type(blk.mlp[2]) is not nn.Dropout:
            raise _refuse(path, "rotation needs torchvision's SwinTransformerBlock with ShiftedWindowAttention and "
                                "MLP (Linear, GELU, Dropout, Linear, Dropout)")


def _check_layernorm(path: str, module: nn.Module) -> None:
    if not isinstance(module, nn.LayerNorm):
        raise _refuse(path, "residual rotation needs a LayerNorm")


def _check_residual(model: nn.Module) -> None:
    stem = model.features[0]
    if type(stem) is not nn.Sequential or len(stem) != 3 or type(stem[0]) is not nn.Conv2d \
            or type(stem[1]) is not Permute:
        raise _refuse("features.0", "residual rotation needs torchvision's patch embedding (Conv2d, Permute, "
                                    "LayerNorm)")
    _check_layernorm("features.0.2", stem[2])
    for i, module in _stages(model):
        if i % 2 == 0:
            if type(module) is not PatchMerging:
                raise _refuse(f"features.{i}", "residual rotation needs torchvision's PatchMerging between stages")
            _check_layernorm(f"features.{i}.norm", module.norm)
    for path, blk in _blocks(model):
        for norm in ("norm1", "norm2"):
            _check_layernorm(f"{path}.{norm}", getattr(blk, norm))
    _check_layernorm("norm", model.norm)
    if type(model.avgpool) is not nn.AdaptiveAvgPool2d or model.avgpool.output_size not in (1, (1, 1)):
        raise _refuse("avgpool", "residual rotation needs the global average pooling, which moves whole tokens")
    if type(model.head) is not nn.Linear:
        raise _refuse("head", "residual rotation needs a Linear head to fold the last stage's rotation into")


def _branches(blk: nn.Module) -> tuple[ResidualBranch, ...]:
    return (ResidualBranch(NormReaders(blk, "norm1", (blk.attn.qkv,)), blk.attn.proj),
            ResidualBranch(NormReaders(blk, "norm2", (blk.mlp[0],)), blk.mlp[3]))


def _residual_streams(model: nn.Module) -> tuple[ResidualStream, ...]:
    """One stream per stage; each ends at the next merging's norm (4 tokens) or at the final norm and the head."""
    stem = model.features[0]
    width, branches, streams = stem[0].out_channels, [], []
    entry: dict = dict(input_convs=(), input_norms=(StreamNorm(stem, "2"),))
    for i, module in _stages(model):
        if i % 2 == 1:
            for blk in module:
                branches.extend(_branches(blk))
            continue
        final = NormReaders(module, "norm", (module.reduction,), tokens=4)
        streams.append(ResidualStream(width=width, added_tensors=(), branches=tuple(branches), final=final,
                                      centred=False, **entry))
        width, branches = module.reduction.out_features, []
        entry = dict(input_convs=(), input_linears=(module.reduction,))
    streams.append(ResidualStream(width=width, added_tensors=(), branches=tuple(branches),
                                  final=NormReaders(model, "norm", (model.head,)), centred=False, **entry))
    return tuple(streams)


def torchvision_swin_rotation_layout(model: nn.Module, residual: bool) -> RotationLayout:
    """The rotation layout of a torchvision Swin v1 (the residual streams only with ``residual``)."""
    _check_blocks(model)
    if residual:
        _check_residual(model)
    blocks = []
    for _, blk in _blocks(model):
        qkv, heads = blk.attn.qkv, blk.attn.num_heads
        blocks.append(BlockRotation(AttentionHeads(qkv, blk.attn.proj, heads, qkv.out_features // (3 * heads)),
                                    OnlineSlot(blk.mlp, "2", blk.mlp[3])))
    return RotationLayout(tuple(blocks), _residual_streams(model) if residual else None)

"""Where a rotation finds the residual streams, norms, heads and MLPs of a timm ``SwinTransformer``
(docs/lowbit.md §2), after checking that the model has the layout the folding assumes. Anything
else is refused naming the module.

Each stage's stream has its own width and its own rotation ``Q_s``. Stage 0's stream is the
patch embedding's output (its LayerNorm, or its conv when it has none); a stage that starts with
``PatchMerging`` starts a new stream: the merging's LayerNorm reads 4 concatenated tokens of the
previous stream (its ``final``), its ``reduction`` writes the new one. Every block is a pre-norm
residual pair like a ViT's: norm1 → qkv … proj, norm2 → fc1 … fc2. Window partition, the cyclic
shift and average pooling move whole tokens, so they commute with a rotation of the channels; the
relative position bias and the shift mask are added to ``q kᵀ``, which the per-head rotations keep.
"""
from __future__ import annotations

from timm.layers import ClassifierHead, Mlp, PatchEmbed
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, SwinTransformerStage, WindowAttention
from torch import nn

from ..errors import UnsupportedModelError
from ..transforms.rotation_layout import (AttentionHeads, BlockRotation, NormReaders, OnlineSlot, ResidualBranch,
                                          ResidualStream, RotationLayout, StreamNorm)

#: Pooling that moves whole tokens (a rotation of the channels commutes with it); max pooling does not.
_LINEAR_POOLS = ("avg", "")


def _blocks(model: nn.Module):
    """``(path, block)`` for every block, in model order."""
    for i, stage in enumerate(model.layers):
        for j, blk in enumerate(stage.blocks):
            yield f"layers.{i}.blocks.{j}", blk


def _check_blocks(model: nn.Module) -> None:
    for i, stage in enumerate(model.layers):
        if type(stage) is not SwinTransformerStage:
            raise UnsupportedModelError(f"module 'layers.{i}': rotation needs timm's SwinTransformerStage")
    for path, blk in _blocks(model):
        if type(blk) is not SwinTransformerBlock or type(blk.attn) is not WindowAttention or type(blk.mlp) is not Mlp:
            raise UnsupportedModelError(f"module {path!r}: rotation needs timm's SwinTransformerBlock/WindowAttention/Mlp")
        if not isinstance(blk.mlp.norm, nn.Identity):
            raise UnsupportedModelError(f"module '{path}.mlp': rotation needs an identity MLP norm slot")


def _check_layernorm(path: str, module: nn.Module) -> None:
    if not isinstance(module, nn.LayerNorm):
        raise UnsupportedModelError(f"module {path!r}: residual rotation needs a LayerNorm")


def _check_residual(model: nn.Module) -> None:
    pe = model.patch_embed
    if type(pe) is not PatchEmbed:
        raise UnsupportedModelError("module 'patch_embed': residual rotation needs timm's PatchEmbed")
    if not isinstance(pe.norm, nn.Identity):
        _check_layernorm("patch_embed.norm", pe.norm)
    if not pe.strict_img_size:
        # norm1's β folds into qkv's bias, which is exact only on real tokens: the zeros that pad a
        # feature map to whole windows would become keys and values of another bias.
        raise UnsupportedModelError("module 'patch_embed': residual rotation needs a fixed image size "
                                    "(dynamic_img_size may pad windows, where norm1's folded bias is wrong)")
    for i, stage in enumerate(model.layers):
        down = stage.downsample
        if type(down) is PatchMerging:
            _check_layernorm(f"layers.{i}.downsample.norm", down.norm)
        elif not isinstance(down, nn.Identity):
            raise UnsupportedModelError(f"module 'layers.{i}.downsample': residual rotation needs PatchMerging or none")
    for path, blk in _blocks(model):
        for norm in ("norm1", "norm2"):
            _check_layernorm(f"{path}.{norm}", getattr(blk, norm))
        (h, w), (wh, ww) = blk.input_resolution, blk.window_size
        if h % wh or w % ww:
            raise UnsupportedModelError(
                f"module {path!r}: residual rotation needs its {h}x{w} tokens to fill whole {wh}x{ww} windows "
                f"(the zeros that pad them would meet norm1's bias folded into qkv)")
    _check_layernorm("norm", model.norm)
    head = model.head
    if type(head) is not ClassifierHead or type(head.fc) is not nn.Linear:
        raise UnsupportedModelError("module 'head': residual rotation needs timm's ClassifierHead with a Linear fc "
                                    "to fold the last stage's rotation into (num_classes=0 would return rotated features)")
    if head.global_pool.pool_type not in _LINEAR_POOLS:
        raise UnsupportedModelError(f"module 'head.global_pool': residual rotation needs average pooling (or none), "
                                    f"not {head.global_pool.pool_type!r}, which does not commute with a rotation")


def _branches(blk: nn.Module) -> tuple[ResidualBranch, ...]:
    return (ResidualBranch(NormReaders(blk, "norm1", (blk.attn.qkv,)), blk.attn.proj),
            ResidualBranch(NormReaders(blk, "norm2", (blk.mlp.fc1,)), blk.mlp.fc2))


def _residual_streams(model: nn.Module) -> tuple[ResidualStream, ...]:
    """One stream per run of stages between patch mergings; each ends at the next merging's norm
    (4 tokens) or at the final norm and the classifier."""
    pe = model.patch_embed
    if isinstance(pe.norm, nn.Identity):
        entry = dict(input_convs=(pe.proj,))
    else:
        entry = dict(input_convs=(), input_norms=(StreamNorm(pe, "norm"),))
    width, branches, streams = pe.proj.out_channels, [], []
    for stage in model.layers:
        down = stage.downsample
        if type(down) is PatchMerging:
            final = NormReaders(down, "norm", (down.reduction,), tokens=4)
            streams.append(ResidualStream(width=width, added_tensors=(), branches=tuple(branches), final=final,
                                          centred=False, **entry))
            width, branches, entry = down.reduction.out_features, [], dict(input_convs=(), input_linears=(down.reduction,))
        for blk in stage.blocks:
            branches.extend(_branches(blk))
    streams.append(ResidualStream(width=width, added_tensors=(), branches=tuple(branches),
                                  final=NormReaders(model, "norm", (model.head.fc,)), centred=False, **entry))
    return tuple(streams)


def swin_rotation_layout(model: nn.Module, residual: bool) -> RotationLayout:
    """The rotation layout of a timm Swin v1 (the residual streams only with ``residual``)."""
    _check_blocks(model)
    if residual:
        _check_residual(model)
    blocks = []
    for _, blk in _blocks(model):
        qkv = blk.attn.qkv
        heads = blk.attn.num_heads
        blocks.append(BlockRotation(AttentionHeads(qkv, blk.attn.proj, heads, qkv.out_features // (3 * heads)),
                                    OnlineSlot(blk.mlp, "norm", blk.mlp.fc2)))
    return RotationLayout(tuple(blocks), _residual_streams(model) if residual else None)

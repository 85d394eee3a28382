"""Where a rotation finds the residual stream, norms, layer scales, heads and MLPs of a timm
``VisionTransformer`` (docs/lowbit.md §2), after checking that the model has the pre-norm layout
the folding assumes. Anything else is refused naming the module.

With the attention-pool head (``global_pool='map'``, the SigLIP towers) the final norm's output is
read by the pool's kv projection only (its latent query is a parameter, not the stream): the last
residual rotation folds into kv. The pool's own attention output, norm and MLP live in its output
space and are not rotated."""
from __future__ import annotations

from timm.layers import AttentionPoolLatent, Mlp
from timm.models.deit import VisionTransformerDistilled
# Imported from vision_transformer (not timm.layers, which gained them after 1.0.3, the floor)
from timm.models.vision_transformer import Attention, Block, LayerScale
from torch import nn

from ..errors import UnsupportedModelError
from ..transforms.rotation_layout import (AttentionHeads, BlockRotation, NormReaders, OnlineSlot, ResidualBranch,
                                          ResidualStream, RotationLayout)

#: Tensors added to (or concatenated with) the stream, where the model has them.
_STREAM_TENSORS = ("cls_token", "reg_token", "dist_token", "pos_embed")


def _check_blocks(model: nn.Module) -> None:
    for name, blk in model.blocks.named_children():
        if type(blk) is not Block or type(blk.attn) is not Attention or type(blk.mlp) is not Mlp:
            raise UnsupportedModelError(f"module 'blocks.{name}': rotation needs timm's Block/Attention/Mlp")
        if not isinstance(blk.attn.q_norm, nn.Identity) or not isinstance(blk.attn.k_norm, nn.Identity) \
                or not isinstance(blk.attn.norm, nn.Identity):
            raise UnsupportedModelError(f"module 'blocks.{name}.attn': rotation does not fold q/k/attention norms")
        if not isinstance(blk.mlp.norm, nn.Identity):
            raise UnsupportedModelError(f"module 'blocks.{name}.mlp': rotation needs an identity MLP norm slot")


def _check_residual(model: nn.Module) -> None:
    for attr in ("norm_pre",):
        if not isinstance(getattr(model, attr), nn.Identity):
            raise UnsupportedModelError(f"module {attr!r}: residual rotation needs it to be an identity")
    if not isinstance(model.patch_embed.norm, nn.Identity):
        raise UnsupportedModelError("module 'patch_embed.norm': residual rotation needs it to be an identity")
    if getattr(model, "attn_pool", None) is not None:
        _check_attention_pool(model)
        heads = ()  # they read the pool's output, not the stream
    else:
        norms = [m for m in (model.norm, model.fc_norm) if not isinstance(m, nn.Identity)]
        if len(norms) != 1 or not isinstance(norms[0], nn.LayerNorm):
            raise UnsupportedModelError("residual rotation needs exactly one final LayerNorm (norm or fc_norm)")
        heads = ("head", "head_dist")
    for attr in heads:
        head = getattr(model, attr, None)
        if head is not None and type(head) is not nn.Linear:
            raise UnsupportedModelError(f"module {attr!r} of type {type(head).__name__}: residual rotation needs a Linear "
                                        f"classifier to fold the last rotation into (num_classes=0 would return rotated "
                                        f"features)")
    for name, blk in model.blocks.named_children():
        for norm_name in ("norm1", "norm2"):
            if not isinstance(getattr(blk, norm_name), nn.LayerNorm):
                raise UnsupportedModelError(f"module 'blocks.{name}.{norm_name}': residual rotation needs a LayerNorm")
        for ls_name in ("ls1", "ls2"):
            if not isinstance(getattr(blk, ls_name), (nn.Identity, LayerScale)):
                raise UnsupportedModelError(f"module 'blocks.{name}.{ls_name}': unknown layer scale")


def _check_attention_pool(model: nn.Module) -> None:
    """The pool's kv reads the final norm's output (the pool's latent query is a parameter, not the stream)."""
    pool = model.attn_pool
    if type(pool) is not AttentionPoolLatent or type(pool.kv) is not nn.Linear:
        raise UnsupportedModelError(f"module 'attn_pool' of type {type(pool).__name__}: residual rotation needs "
                                    f"timm's AttentionPoolLatent with a Linear kv to fold the last rotation into")
    if not isinstance(model.norm, nn.LayerNorm):
        raise UnsupportedModelError("module 'norm': residual rotation needs a final LayerNorm before the attention "
                                    "pool (fc_norm=True normalises after it, so the pool would read the stream itself)")
    if pool.pos_embed is not None:
        raise UnsupportedModelError("module 'attn_pool': residual rotation does not fold the pool's position "
                                    "embedding (pos_embed='abs'), added after the final norm")


def _residual_stream(model: nn.Module) -> ResidualStream:
    """Writers: patch embedding, prefix tokens, position embedding, each block's proj and fc2 (after
    its LayerScale); readers: each block's qkv (norm1) and fc1 (norm2), the heads (final norm)."""
    branches = []
    for blk in model.blocks:
        for norm, reader, writer, ls in (("norm1", blk.attn.qkv, blk.attn.proj, "ls1"),
                                         ("norm2", blk.mlp.fc1, blk.mlp.fc2, "ls2")):
            branches.append(ResidualBranch(NormReaders(blk, norm, (reader,)), writer,
                                           ls if isinstance(getattr(blk, ls), LayerScale) else None))
    if getattr(model, "attn_pool", None) is not None:  # the pool's kv reads the final norm
        heads, final = [model.attn_pool.kv], "norm"
    else:
        heads = [model.head] + ([model.head_dist] if isinstance(model, VisionTransformerDistilled) else [])
        final = "norm" if not isinstance(model.norm, nn.Identity) else "fc_norm"
    return ResidualStream(
        width=model.embed_dim, input_convs=(model.patch_embed.proj,),
        added_tensors=tuple(t for t in (getattr(model, a, None) for a in _STREAM_TENSORS) if t is not None),
        branches=tuple(branches), final=NormReaders(model, final, tuple(h for h in heads if isinstance(h, nn.Linear))))


def vit_rotation_layout(model: nn.Module, residual: bool) -> RotationLayout:
    """The rotation layout of a timm ViT / DeiT (the residual part only with ``residual``)."""
    _check_blocks(model)
    if residual:
        _check_residual(model)
    blocks = tuple(BlockRotation(AttentionHeads(b.attn.qkv, b.attn.proj, b.attn.num_heads, b.attn.head_dim),
                                 OnlineSlot(b.mlp, "norm", b.mlp.fc2)) for b in model.blocks)
    return RotationLayout(blocks, _residual_stream(model) if residual else None)

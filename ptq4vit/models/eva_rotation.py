"""Where a rotation finds the residual stream, norms, layer scales and MLPs of a timm ``Eva`` (EVA-02;
docs/lowbit.md §2), after checking that the model has the pre-norm layout the folding assumes; anything
else is refused naming the module.

The residual stream is folded as in a ViT (:mod:`.vit_rotation`): the patch conv, class / register tokens
and the position embedding write it; each block's q/k/v (fused ``qkv``, or three projections) read
``norm1``, ``proj`` writes after ``gamma_1``; the MLP's first layers (``fc1``, or SwiGLU's ``fc1_g`` and
``fc1_x``, or GluMlp's packed ``fc1``) read ``norm2``, ``fc2`` writes after ``gamma_2``; the final norm is read
by the head (average or class-token pooling commute with the rotation; max pooling does not) or, with the
attention-pool head, by the pool's kv. LayerScale is two block parameters, folded and set to None as in
BEiT; the fused qkv's q/v bias parameters are moved into ``qkv``'s own bias first (the same product), so
the norm's shift folds into one bias.

fc2's input (the gated product of SwiGLU, or the GELU output) is rotated online: in the MLP's identity
``norm`` slot, or after its sub-LayerNorm (``scale_mlp=True``).

``rotate_heads`` is refused by name where the rotary position embedding is on: it rotates q and k
between the qkv product and ``q @ kᵀ`` by position-dependent 2x2 rotations within each head, which a
per-head rotation of q and k does not commute with (rotating v alone, undone in proj, would be half of
``rotate_heads``). It is refused too where the attention's sub-LayerNorm (``scale_attn_inner``) sits
between the heads and proj. Without either, the heads are rotated as in BEiT.
"""
from __future__ import annotations

from typing import Optional

from timm.layers import AttentionPoolLatent, GluMlp, Mlp, PatchEmbed, SwiGLU
from timm.models.eva import EvaAttention, EvaBlock
from torch import nn

from ..errors import UnsupportedModelError
from ..transforms.rotation_layout import (AttentionHeads, BlockRotation, NormReaders, OnlineSlot, ResidualBranch,
                                          ResidualStream, RotationLayout)
from .qkv_bias import move_qkv_biases
from .timm_rotation_checks import check_block_norms, check_final_norm_and_head

#: Tensors added to (or concatenated with) the stream, where the model has them.
_STREAM_TENSORS = ("cls_token", "reg_token", "pos_embed")


def _refuse(path: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"module {path!r}: {why}")


def _mlp_readers(mlp: nn.Module) -> tuple[nn.Linear, ...]:
    return (mlp.fc1_g, mlp.fc1_x) if type(mlp) is SwiGLU else (mlp.fc1,)


def _check_blocks(model: nn.Module) -> None:
    for i, blk in enumerate(model.blocks):
        path = f"blocks.{i}"
        if type(blk) is not EvaBlock or type(blk.attn) is not EvaAttention:
            raise _refuse(path, "rotation needs timm's pre-norm EvaBlock and EvaAttention")
        attn = blk.attn
        for name in ("q_norm", "k_norm"):
            if type(getattr(attn, name)) is not nn.Identity:
                raise _refuse(f"{path}.attn.{name}", "rotation does not fold q/k norms")
        if getattr(attn, "gate", None) is not None:
            raise _refuse(f"{path}.attn.gate", "rotation does not fold a gated attention")
        if attn.qkv is not None and attn.q_bias is not None and attn.qkv_bias_separate:
            raise _refuse(f"{path}.attn", "rotation needs the q/v biases added inside the qkv product "
                                          "(qkv_bias_separate=False)")
        mlp = blk.mlp
        if type(mlp) not in (Mlp, SwiGLU, GluMlp) or (type(mlp) is GluMlp and type(mlp.fc1) is not nn.Linear):
            raise _refuse(f"{path}.mlp", f"rotation needs timm's Mlp, SwiGLU or a linear GluMlp, not "
                                         f"{type(mlp).__name__}")
        if type(mlp) is Mlp and not isinstance(mlp.norm, nn.Identity):
            raise _refuse(f"{path}.mlp.norm", "rotation needs an identity MLP norm slot for fc2's online rotation")
        if type(mlp) is not Mlp and not isinstance(mlp.norm, (nn.Identity, nn.LayerNorm)):
            raise _refuse(f"{path}.mlp.norm", "rotation needs an identity slot or a LayerNorm before fc2 for fc2's "
                                              "online rotation")


def _check_residual(model: nn.Module) -> None:
    if not isinstance(model.norm_pre, nn.Identity):
        raise _refuse("norm_pre", "residual rotation needs it to be an identity (use_pre_transformer_norm=False)")
    if type(model.patch_embed) is not PatchEmbed or type(model.patch_embed.proj) is not nn.Conv2d:
        raise _refuse("patch_embed", "residual rotation needs timm's PatchEmbed with a Conv2d")
    if not isinstance(model.patch_embed.norm, nn.Identity):
        raise _refuse("patch_embed.norm", "residual rotation needs it to be an identity")
    if model.attn_pool is not None:
        pool = model.attn_pool
        if type(pool) is not AttentionPoolLatent or type(pool.kv) is not nn.Linear:
            raise _refuse("attn_pool", "residual rotation needs timm's AttentionPoolLatent with a Linear kv to fold "
                                       "the last rotation into")
        if not isinstance(model.norm, nn.LayerNorm):
            raise _refuse("norm", "residual rotation needs a final LayerNorm before the attention pool")
        if pool.pos_embed is not None:
            raise _refuse("attn_pool", "residual rotation does not fold the pool's position embedding "
                                       "(pos_embed='abs'), added after the final norm")
    else:
        if model.global_pool not in ("avg", "token"):
            raise _refuse("<model>", f"residual rotation needs average or class-token pooling, not "
                                     f"global_pool={model.global_pool!r} (max pooling does not commute with a rotation)")
        check_final_norm_and_head(model)
    check_block_norms(model)


def _qkv_readers(attn: nn.Module) -> tuple[nn.Linear, ...]:
    return (attn.qkv,) if attn.qkv is not None else (attn.q_proj, attn.k_proj, attn.v_proj)


def _residual_stream(model: nn.Module) -> ResidualStream:
    branches = []
    for blk in model.blocks:
        scales = ("gamma_1", "gamma_2") if blk.gamma_1 is not None else (None, None)
        branches.append(ResidualBranch(NormReaders(blk, "norm1", _qkv_readers(blk.attn)), blk.attn.proj, scales[0],
                                       None))
        branches.append(ResidualBranch(NormReaders(blk, "norm2", _mlp_readers(blk.mlp)), blk.mlp.fc2, scales[1], None))
    if model.attn_pool is not None:  # the pool's kv reads the final norm (its latent query is not the stream)
        final = NormReaders(model, "norm", (model.attn_pool.kv,))
    else:
        final = NormReaders(model, "norm" if not isinstance(model.norm, nn.Identity) else "fc_norm", (model.head,))
    return ResidualStream(width=model.embed_dim, input_convs=(model.patch_embed.proj,),
                          added_tensors=tuple(t for t in (getattr(model, a, None) for a in _STREAM_TENSORS)
                                              if t is not None),
                          branches=tuple(branches), final=final)


def _heads_refused(model: nn.Module) -> Optional[str]:
    if model.rope is not None:
        return ("module 'rope': rotate_heads does not apply to Eva with a rotary position embedding: it rotates q "
                "and k between qkv and q @ kᵀ, which a per-head rotation of q and k does not commute with (set "
                "rotate_heads=False: the residual and fc2 rotations apply)")
    for i, blk in enumerate(model.blocks):
        if not isinstance(blk.attn.norm, nn.Identity):
            return (f"module 'blocks.{i}.attn.norm': rotate_heads does not apply across the attention's "
                    f"sub-LayerNorm between the heads and proj (scale_attn_inner=True; set rotate_heads=False: the "
                    f"residual and fc2 rotations apply)")
    return None


def _heads(attn: nn.Module) -> AttentionHeads:
    qkv = attn.qkv if attn.qkv is not None else (attn.q_proj, attn.k_proj, attn.v_proj)
    return AttentionHeads(qkv, attn.proj, attn.num_heads, attn.head_dim)


def eva_rotation_layout(model: nn.Module, residual: bool) -> RotationLayout:
    """The rotation layout of a timm Eva (the residual part only with ``residual``); each fused qkv's q/v
    biases are moved into its own bias once every check has passed (:attr:`RotationLayout.prepare`)."""
    _check_blocks(model)
    if residual:
        _check_residual(model)
    refused = _heads_refused(model)
    blocks = tuple(BlockRotation(None if refused else _heads(blk.attn),
                                 OnlineSlot(blk.mlp, "norm", blk.mlp.fc2, after=not isinstance(blk.mlp.norm, nn.Identity)))
                   for blk in model.blocks)
    moves = tuple((lambda a=blk.attn: move_qkv_biases(a)) for blk in model.blocks if blk.attn.qkv is not None)
    return RotationLayout(blocks, _residual_stream(model) if residual else None, heads_refused=refused, prepare=moves)

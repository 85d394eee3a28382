"""Where a rotation finds the residual stream, norms, layer scales, heads and MLPs of a timm ``Beit`` (BEiT,
BEiT v2; docs/lowbit.md §2), after checking that the model has the pre-norm layout the folding assumes;
anything else is refused naming the module.

The layout of timm's ViT (:mod:`.vit_rotation`), with three differences. The relative position bias (per
block or shared) is added to ``q kᵀ``, which the per-head rotations keep. LayerScale is two parameters of
the block (``gamma_1``, ``gamma_2``), folded into proj and fc2 and then set to None (the block's forward
then skips both). The q and v biases are parameters of the attention added in ``F.linear`` (``k_bias`` a
zero buffer) beside a bias-free ``qkv``: before anything is folded they are moved into ``qkv``'s own bias,
the same product (timm's forward takes ``self.qkv(x)`` once ``q_bias`` is None), so that the norm's shift
and the head rotations fold into one bias like any other reader's.
"""
from __future__ import annotations

from timm.layers import Mlp, PatchEmbed
from timm.models.beit import Attention, Block
from torch import nn

from ..errors import UnsupportedModelError
from ..transforms.rotation_layout import (AttentionHeads, BlockRotation, NormReaders, OnlineSlot, ResidualBranch,
                                          ResidualStream, RotationLayout)
from .qkv_bias import move_qkv_biases
from .timm_rotation_checks import check_block_norms, check_final_norm_and_head


def _refuse(path: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"module {path!r}: {why}")


def _check_blocks(model: nn.Module) -> None:
    for i, blk in enumerate(model.blocks):
        path = f"blocks.{i}"
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise _refuse(path, "rotation needs timm's BEiT Block and Attention")
        if type(blk.mlp) is not Mlp:
            raise _refuse(f"{path}.mlp", f"rotation needs timm's Mlp, not {type(blk.mlp).__name__} (swiglu_mlp=True)")
        if not isinstance(blk.mlp.norm, nn.Identity):
            raise _refuse(f"{path}.mlp.norm", "rotation needs an identity MLP norm slot (scale_mlp=False) for fc2's "
                                              "online rotation")
        if blk.attn.q_bias is not None and blk.attn.qkv_bias_separate:
            raise _refuse(f"{path}.attn", "rotation needs the q/v biases added inside the qkv product "
                                          "(qkv_bias_separate=False)")


def _check_residual(model: nn.Module) -> None:
    if type(model.patch_embed) is not PatchEmbed or type(model.patch_embed.proj) is not nn.Conv2d:
        raise _refuse("patch_embed", "residual rotation needs timm's PatchEmbed with a Conv2d")
    if not isinstance(model.patch_embed.norm, nn.Identity):
        raise _refuse("patch_embed.norm", "residual rotation needs it to be an identity")
    check_final_norm_and_head(model)
    check_block_norms(model)


def _residual_stream(model: nn.Module) -> ResidualStream:
    """Writers: the patch conv, the class token, the position embedding, each block's proj and fc2 (after
    gamma_1 / gamma_2); readers: each block's qkv (norm1) and fc1 (norm2), the head (the final norm: ``norm``
    on the class token, or ``fc_norm`` on the mean patch token)."""
    branches = []
    for blk in model.blocks:
        scales = ("gamma_1", "gamma_2") if blk.gamma_1 is not None else (None, None)
        branches.append(ResidualBranch(NormReaders(blk, "norm1", (blk.attn.qkv,)), blk.attn.proj, scales[0], None))
        branches.append(ResidualBranch(NormReaders(blk, "norm2", (blk.mlp.fc1,)), blk.mlp.fc2, scales[1], None))
    final = "norm" if not isinstance(model.norm, nn.Identity) else "fc_norm"
    return ResidualStream(width=model.embed_dim, input_convs=(model.patch_embed.proj,),
                          added_tensors=tuple(t for t in (model.cls_token, model.pos_embed) if t is not None),
                          branches=tuple(branches), final=NormReaders(model, final, (model.head,)))


def beit_rotation_layout(model: nn.Module, residual: bool) -> RotationLayout:
    """The rotation layout of a timm BEiT (the residual part only with ``residual``); moves each attention's
    q/v biases into its qkv layer (the same function) once every check has passed."""
    _check_blocks(model)
    if residual:
        _check_residual(model)
    blocks = []
    for blk in model.blocks:
        move_qkv_biases(blk.attn)
        blocks.append(BlockRotation(AttentionHeads(blk.attn.qkv, blk.attn.proj, blk.attn.num_heads,
                                                   blk.attn.qkv.out_features // (3 * blk.attn.num_heads)),
                                    OnlineSlot(blk.mlp, "norm", blk.mlp.fc2)))
    return RotationLayout(tuple(blocks), _residual_stream(model) if residual else None)

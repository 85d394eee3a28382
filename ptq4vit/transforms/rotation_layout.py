"""What a rotation needs to know of a model, in terms of its modules (docs/lowbit.md §2).

A family's adapter (:meth:`ptq4vit.models.Adapter.rotation_layout`) checks that a model has the
structure a rotation assumes and describes it with these records; :mod:`.rotation` then folds the
rotations into the modules named here and knows nothing of any family's layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import nn


@dataclass(frozen=True)
class PackedRows:
    """The rows ``rows`` of a packed projection ``owner.<weight_name>`` (bias ``owner.<bias_name>``), folded
    into by a rotation as a linear layer of its own: ``nn.MultiheadAttention``'s ``in_proj_weight`` in an
    attention-pool head, whose k and v rows read the stream while its q rows read a learned probe. The
    bias must exist (a norm's shift folds into it); writes go through the views into the packed tensors."""
    owner: nn.Module
    weight_name: str
    bias_name: str
    rows: slice

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.owner, self.weight_name)[self.rows]

    @property
    def bias(self) -> torch.Tensor:
        return getattr(self.owner, self.bias_name)[self.rows]

    @property
    def in_features(self) -> int:
        return getattr(self.owner, self.weight_name).shape[1]


@dataclass(frozen=True)
class NormReaders:
    """The LayerNorm at ``owner.<norm>`` and every linear layer that reads its output (only they do).

    ``tokens`` > 1: the readers read that many stream tokens concatenated along the channels, so
    they see the stream rotated by ``blockdiag(Q, …, Q)``: normed together (Swin's patch merging: a
    norm over 4 neighbours), or normed one by one and then concatenated (Hugging Face DINOv2's
    classifier: the class token and the mean patch token), the norm's affine then repeated per token.
    """
    owner: nn.Module
    norm: str
    readers: tuple[Union[nn.Linear, PackedRows], ...]
    tokens: int = 1


@dataclass(frozen=True)
class StreamNorm:
    """A LayerNorm at ``owner.<norm>`` whose output *is* the stream (Swin's patch-embedding norm)."""
    owner: nn.Module
    norm: str


@dataclass(frozen=True)
class ResidualBranch:
    """One branch added to the residual stream: ``norm`` → ``readers`` … → ``writer`` → layer scale → added.

    ``layer_scale`` is the attribute of ``input.owner`` holding a LayerScale (a per-channel scale,
    the parameter ``layer_scale_param`` of that module, on the writer's output), or None when the
    branch has none. ``layer_scale_param=None``: the attribute is the scale parameter itself (BEiT's
    ``gamma_1``), which becomes None once folded.
    """
    input: NormReaders
    writer: nn.Linear
    layer_scale: Optional[str] = None
    layer_scale_param: Optional[str] = "gamma"


@dataclass(frozen=True)
class ResidualStream:
    """Everything that writes or reads the residual stream.

    ``input_convs`` write the stream from outside it (the patch embedding: output channels are
    stream channels); ``added_tensors`` are added to or concatenated with it (class / register /
    distillation tokens, position embeddings; their last dim is the stream's); ``branches`` are
    the residual branches in model order; ``final`` is the last norm and the layers that read it
    (the heads, or the next stage's patch merging). ``input_norms`` write the stream as their
    output (a patch embedding with a norm); ``input_linears`` write it from the previous stage's
    stream (patch merging's reduction, also a reader of that stream's ``final``).

    ``centred``: every writer's output is centred, so the stream's norms see mean-free tokens and
    become RMS norms. Where a norm reads several tokens at once (patch merging over 4 tokens), the
    tokens' own means reach its output and must not be removed: ``centred=False`` keeps them, the
    rotation is drawn to fix the all-ones direction (so it commutes with the norms' centring) and
    the norms become affine-free LayerNorms.
    """
    width: int
    input_convs: tuple[nn.Module, ...]
    added_tensors: tuple[nn.Parameter, ...]
    branches: tuple[ResidualBranch, ...]
    final: NormReaders
    input_norms: tuple[StreamNorm, ...] = ()
    input_linears: tuple[nn.Linear, ...] = ()
    centred: bool = True


@dataclass(frozen=True)
class AttentionHeads:
    """A fused q/k/v projection (rows: all q heads, all k heads, all v heads), or the q, k and v
    projections as three layers, and the output projection that reads the concatenated heads."""
    qkv: Union[nn.Linear, tuple[nn.Linear, nn.Linear, nn.Linear]]
    proj: nn.Linear
    num_heads: int
    head_dim: int


@dataclass(frozen=True)
class OnlineSlot:
    """An identity module at ``owner.<attr>`` directly in front of ``linear``: where a rotation that
    cannot be folded backwards (through a nonlinearity) runs online.

    ``after``: the module at ``owner.<attr>`` is not an identity but the activation right before
    ``linear`` (a model with no identity slot there); the rotation runs after it, the slot becoming
    ``nn.Sequential(activation, OnlineRotation)``."""
    owner: nn.Module
    attr: str
    linear: nn.Linear
    after: bool = False


@dataclass(frozen=True)
class BlockRotation:
    """The parts of one block rotated on their own: the attention heads (None where the layout refuses
    ``rotate_heads``, :attr:`RotationLayout.heads_refused`) and the MLP's second layer."""
    attention: Optional[AttentionHeads]
    fc2: OnlineSlot


@dataclass(frozen=True)
class RotationLayout:
    """A model as a rotation sees it; ``residual`` is filled in only when the residual rotation is asked:
    one stream (a plain transformer), or one per stage in model order (a hierarchical model, each
    stage's stream with its own width and rotation, the next written from the previous one's ``final``).

    ``heads_refused``: why ``rotate_heads`` cannot apply to this model (one line naming the module), None
    where it can; the residual and fc2 rotations may still apply. ``prepare``: function-preserving changes
    the folding needs (EVA: the q/v biases moved into qkv's own bias), run once every check has passed.
    """
    blocks: tuple[BlockRotation, ...]
    residual: Union[ResidualStream, tuple[ResidualStream, ...], None] = None
    heads_refused: Optional[str] = None
    prepare: tuple[Callable[[], None], ...] = ()

    @property
    def residual_streams(self) -> tuple[ResidualStream, ...]:
        if self.residual is None:
            return ()
        return self.residual if isinstance(self.residual, tuple) else (self.residual,)

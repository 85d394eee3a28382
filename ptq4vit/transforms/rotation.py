"""Orthogonal rotations of a transformer that leave its float function unchanged (docs/lowbit.md §2).

Channel outliers (a few input channels of a linear layer far above the others) break uniform
low-bit quantization of activations. Rotating the activations by an orthogonal ``Q`` spreads
each outlier over many channels, and ``x W^T = (x Q)(W Q)^T`` keeps the product exact, so the
rotation can be folded into the weights. Three independent parts:

* **residual**: the residual stream is rotated by one global ``Q``. LayerNorm does not commute
  with ``Q`` (its centring), so every residual writer (patch embedding, class/register tokens,
  position embedding, attention ``proj``, ``fc2``) has its output centred, which makes
  LayerNorm's centring a no-op; the norms become :class:`RMSNorm` (no affine), their affine
  folded into the linear layers that read them, LayerScale folded into the writers. Then every
  writer is multiplied by ``Qᵀ`` on its output side and every reader by ``Q`` on its input side.
  A hierarchical model (Swin) has one stream per stage, each with its own ``Q_s``: a LayerNorm
  that writes a stream (the patch-embedding norm) becomes a :class:`RotatedLayerNorm`; patch
  merging reads 4 concatenated tokens of stream ``s`` (rotated by ``blockdiag(Q_s ×4)``, still
  mean-free) and its reduction writes stream ``s+1``.
* **heads**: per head, q and k get the same ``R_h`` (``q kᵀ`` unchanged), v gets ``S_h`` undone
  in ``proj``'s input columns; folded into qkv and proj, so nothing runs online.
* **fc2**: the post-GELU input of fc2 cannot be folded into fc1 (GELU is in between), so an
  :class:`OnlineRotation` sits in front of fc2 (in an identity slot the adapter names: the MLP's
  ``norm`` in timm's ViT) and ``Rᵀ`` is folded into fc2's weight.

Where these modules are is the family's knowledge: its adapter checks the model and describes it
(:mod:`.rotation_layout`); a family whose adapter has no ``rotation_layout`` is refused by name.

Folding is done in float64; the result is cast back to each parameter's dtype.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from ..errors import UnsupportedModelError, UserError
from ..recipes import Recipe
from ..recipes.transforms import ROTATION_KINDS
from .modules import OnlineRotation, RMSNorm, RotatedLayerNorm
from .orthogonal import fixing_ones, make_rotation
from .rotation_layout import AttentionHeads, NormReaders, OnlineSlot, PackedRows, ResidualStream, StreamNorm

if TYPE_CHECKING:
    from ..models import AdapterRegistry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RotationOptions:
    """Which rotations to apply (each part switchable for ablations) and how they are drawn."""
    residual: bool = False
    heads: bool = False
    fc2: bool = False
    kind: str = "hadamard"
    seed: int = 0

    def __post_init__(self):
        if self.kind not in ROTATION_KINDS:
            raise UserError(f"rotation kind must be one of {ROTATION_KINDS}, got {self.kind!r}")

    @property
    def any(self) -> bool:
        return self.residual or self.heads or self.fc2

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> "RotationOptions":
        """The recipe's rotation transform (nothing rotated without one)."""
        rotation = recipe.transform("rotation")
        if rotation is None:
            return cls()
        return cls(residual=rotation.residual, heads=rotation.heads, fc2=rotation.fc2, kind=rotation.kind,
                   seed=rotation.seed)


# ----------------------------------------------------------------------------- folding helpers


def _rms_norm(ln: nn.LayerNorm) -> RMSNorm:
    """LayerNorm on a zero-mean input without its affine: ``x / sqrt(mean(x²) + eps)``."""
    return RMSNorm(ln.normalized_shape[-1], ln.eps)


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def _centre_rows(w: torch.Tensor) -> torch.Tensor:
    """Subtract the mean over dim 0 (the residual channels a writer produces)."""
    return w - w.mean(0, keepdim=True)


def _fold_norm_into(norm: nn.LayerNorm, readers: list["nn.Linear | PackedRows"]) -> None:
    """``Linear(LN(x)) = Linear'(LN₀(x))`` with LN₀ affine-free: W' = W diag(γ), b' = b + W β. A reader of
    several normed tokens concatenated (``NormReaders.tokens``) sees γ and β once per token."""
    for lin in readers:
        reps = lin.in_features // norm.normalized_shape[-1]
        gamma = _f64(norm.weight).repeat(reps) if norm.weight is not None else None
        beta = _f64(norm.bias).repeat(reps) if norm.bias is not None else None
        w = _f64(lin.weight)
        if beta is not None:
            b = (_f64(lin.bias) if lin.bias is not None else w.new_zeros(w.shape[0])) + w @ beta
            if lin.bias is None:
                lin.bias = nn.Parameter(b.to(lin.weight.dtype).to(lin.weight.device))
            else:
                _assign(lin.bias, b)
        if gamma is not None:
            _assign(lin.weight, w * gamma)


def _fold_layerscale_into(g: torch.Tensor, writer: nn.Linear) -> None:
    g = _f64(g)
    _assign(writer.weight, _f64(writer.weight) * g.unsqueeze(1))
    if writer.bias is not None:
        _assign(writer.bias, _f64(writer.bias) * g)


def _rotate_writer(lin: nn.Linear, q: torch.Tensor, centre: bool = True) -> None:
    """Output ``y = x Wᵀ + b`` becomes ``(y - mean(y)) Q``: W' = Qᵀ(W - mean of rows), b' = (b - mean(b)) Q;
    without ``centre``, ``y Q``."""
    w = _f64(lin.weight)
    _assign(lin.weight, q.t() @ (_centre_rows(w) if centre else w))
    if lin.bias is not None:
        b = _f64(lin.bias)
        _assign(lin.bias, ((b - b.mean()) if centre else b) @ q)


def _rotate_reader(lin: "nn.Linear | PackedRows", q: torch.Tensor) -> None:
    """``lin`` reads ``x Q``: W' = W Q."""
    _assign(lin.weight, _f64(lin.weight) @ q)


# ----------------------------------------------------------------------------- the three parts


def rotate_heads(attn: AttentionHeads, gen: torch.Generator, kind: str) -> None:
    """Per-head rotations of q, k (shared) and v (undone in proj), folded into qkv and proj."""
    h, d = attn.num_heads, attn.head_dim
    dim = h * d
    layers = attn.qkv if isinstance(attn.qkv, tuple) else (attn.qkv,)
    w = torch.cat([_f64(lin.weight) for lin in layers])
    b = torch.cat([_f64(lin.bias) for lin in layers]) if layers[0].bias is not None else None
    pw = _f64(attn.proj.weight)
    for i in range(h):
        r_qk = make_rotation(d, kind, gen).dense().to(w.device)
        r_v = make_rotation(d, kind, gen).dense().to(w.device)
        for block, r in ((0, r_qk), (1, r_qk), (2, r_v)):
            rows = slice(block * dim + i * d, block * dim + (i + 1) * d)
            w[rows] = r.t() @ w[rows]
            if b is not None:
                b[rows] = b[rows] @ r
        cols = slice(i * d, (i + 1) * d)
        pw[:, cols] = pw[:, cols] @ r_v
    sizes = [lin.out_features for lin in layers]
    for lin, wi, bi in zip(layers, w.split(sizes), b.split(sizes) if b is not None else [None] * len(layers)):
        _assign(lin.weight, wi)
        if bi is not None:
            _assign(lin.bias, bi)
    _assign(attn.proj.weight, pw)


def rotate_fc2_input(slot: OnlineSlot, gen: torch.Generator, kind: str) -> None:
    """Put an :class:`OnlineRotation` in the slot before fc2 (after the activation there, for a slot
    ``after`` it) and fold its transpose into fc2's weight."""
    fc2 = slot.linear
    rot = make_rotation(fc2.in_features, kind, gen)
    _rotate_reader(fc2, rot.dense().to(fc2.weight.device))
    online = OnlineRotation(rot, fc2.weight.dtype, fc2.weight.device)
    setattr(slot.owner, slot.attr, nn.Sequential(getattr(slot.owner, slot.attr), online) if slot.after else online)


def _affine_free(ln: nn.LayerNorm, centred: bool) -> nn.Module:
    """What a LayerNorm whose affine was folded away becomes: an RMS norm on a centred stream, an
    affine-free LayerNorm on a stream that keeps its means."""
    if centred:
        return _rms_norm(ln)
    return nn.LayerNorm(ln.normalized_shape, ln.eps, elementwise_affine=False)


def _fold_and_replace_norm(norm: NormReaders, centred: bool = True) -> None:
    """Fold the norm's affine into its readers; the norm becomes affine-free."""
    ln = getattr(norm.owner, norm.norm)
    _fold_norm_into(ln, list(norm.readers))
    setattr(norm.owner, norm.norm, _affine_free(ln, centred))


def _rotate_stream_norm(slot: StreamNorm, q: torch.Tensor, centred: bool) -> None:
    """The LayerNorm writing the stream becomes ``LN₀(x) Wᵀ + b``: its output ``y = γ ⊙ LN₀(x) + β``
    centred and rotated, ``(y - mean(y)) Q = LN₀(x) diag(γ) C Q + β C Q`` (``C = I - 11ᵀ/n``), or
    only rotated, ``LN₀(x) diag(γ) Q + β Q``."""
    ln = getattr(slot.owner, slot.norm)
    n = ln.normalized_shape[-1]
    like = ln.weight if ln.weight is not None else q
    gamma = _f64(ln.weight) if ln.weight is not None else q.new_ones(n)
    beta = _f64(ln.bias) if ln.bias is not None else q.new_zeros(n)
    a = torch.diag(gamma)
    if centred:
        a = a - gamma.unsqueeze(1) / n   # diag(γ) C: each row minus its mean
        beta = beta - beta.mean()
    weight = (a @ q).t().to(dtype=like.dtype, device=like.device)
    bias = (beta @ q).to(dtype=like.dtype, device=like.device)
    setattr(slot.owner, slot.norm, RotatedLayerNorm(n, ln.eps, weight, bias))


def _rotate_conv_writer(conv: nn.Module, q: torch.Tensor, centre: bool) -> None:
    cw = _f64(conv.weight)
    shape = cw.shape
    cw = cw.reshape(shape[0], -1)
    _assign(conv.weight, (q.t() @ (_centre_rows(cw) if centre else cw)).reshape(shape))
    if conv.bias is not None:
        cb = _f64(conv.bias)
        _assign(conv.bias, ((cb - cb.mean()) if centre else cb) @ q)


def rotate_residual(stream: ResidualStream, q: torch.Tensor) -> None:
    """Fold norms and LayerScale, centre the writers (a ``centred`` stream) and rotate the residual
    stream by ``q`` (which fixes the all-ones direction where the stream is not centred)."""
    centred = stream.centred
    for slot in stream.input_norms:
        _rotate_stream_norm(slot, q, centred)
    for lin in stream.input_linears:
        _rotate_writer(lin, q, centred)
    for conv in stream.input_convs:
        _rotate_conv_writer(conv, q, centred)
    for t in stream.added_tensors:
        v = _f64(t)
        _assign(t, ((v - v.mean(-1, keepdim=True)) if centred else v) @ q)

    for branch in stream.branches:
        if branch.layer_scale is not None:
            owner, attr, param = branch.input.owner, branch.layer_scale, branch.layer_scale_param
            if param is None:  # the attribute is the scale parameter itself: None once folded
                _fold_layerscale_into(getattr(owner, attr), branch.writer)
                setattr(owner, attr, None)
            else:
                _fold_layerscale_into(getattr(getattr(owner, attr), param), branch.writer)
                setattr(owner, attr, nn.Identity())
        _fold_and_replace_norm(branch.input, centred)
        for reader in branch.input.readers:
            _rotate_reader(reader, q)
        _rotate_writer(branch.writer, q, centred)

    _fold_and_replace_norm(stream.final, centred)
    # Readers of ``tokens`` concatenated stream tokens see each token rotated: blockdiag(Q, ..., Q),
    # orthogonal, and fixing the all-ones direction where Q does.
    q_in = torch.block_diag(*[q] * stream.final.tokens) if stream.final.tokens > 1 else q
    for reader in stream.final.readers:
        _rotate_reader(reader, q_in)


def apply_rotation(model: nn.Module, options: RotationOptions, *,
                   adapters: Optional["AdapterRegistry"] = None) -> nn.Module:
    """Rotate a float model in place (see the module docstring); returns it. Deterministic in ``options.seed``.

    The model's adapter in ``adapters`` (default: the shipped ones) describes where its stream,
    norms, heads and MLPs are (:meth:`~ptq4vit.models.Adapter.rotation_layout`), or refuses the
    model by name before anything is changed.
    """
    if not options.any:
        return model
    if adapters is None:
        from ..models import DEFAULT_ADAPTERS as adapters
    layout = adapters.adapter_for(model).rotation_layout(model, residual=options.residual)
    if options.heads and layout.heads_refused is not None:
        raise UnsupportedModelError(layout.heads_refused)
    for change in layout.prepare:
        change()
    gen = torch.Generator().manual_seed(options.seed)
    with torch.no_grad():
        if options.residual:
            device = next(model.parameters()).device
            qs = [make_rotation(s.width, options.kind, gen).dense() for s in layout.residual_streams]
            qs = [(q if s.centred else fixing_ones(q)).to(device) for s, q in zip(layout.residual_streams, qs)]
            for stream, q in zip(layout.residual_streams, qs):  # in model order: a stage's reader folds first
                rotate_residual(stream, q)
        for blk in layout.blocks:
            if options.heads:
                rotate_heads(blk.attention, gen, options.kind)
            if options.fc2:
                rotate_fc2_input(blk.fc2, gen, options.kind)
    logger.info("rotated %s: %s", type(model).__name__, options)
    return model

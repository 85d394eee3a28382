"""Orthogonal rotations of a timm ViT that leave its float function unchanged (docs/lowbit.md §2).

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
* **heads**: per head, q and k get the same ``R_h`` (``q kᵀ`` unchanged), v gets ``S_h`` undone
  in ``proj``'s input columns; folded into qkv and proj, so nothing runs online.
* **fc2**: the post-GELU input of fc2 cannot be folded into fc1 (GELU is in between), so an
  :class:`OnlineRotation` sits in front of fc2 (in the MLP's ``norm`` slot, an identity in timm's
  ViT) and ``Rᵀ`` is folded into fc2's weight.

Folding is done in float64; the result is cast back to each parameter's dtype.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from timm.layers import Mlp
from timm.models.deit import VisionTransformerDistilled
# Imported from vision_transformer (not timm.layers, which gained them after 1.0.3, the floor)
from timm.models.vision_transformer import Attention, Block, LayerScale, VisionTransformer

from ..errors import UnsupportedModelError, UserError
from ..presets import ROTATION_KINDS, Preset
from .modules import OnlineRotation, RMSNorm
from .orthogonal import make_rotation

logger = logging.getLogger(__name__)

ROTATABLE_MODELS = (VisionTransformer, VisionTransformerDistilled)


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
    def from_preset(cls, preset: Preset) -> "RotationOptions":
        return cls(residual=preset.rotate_residual, heads=preset.rotate_heads, fc2=preset.rotate_fc2,
                   kind=preset.rotation_kind, seed=preset.rotation_seed)


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


def _fold_norm_into(norm: nn.LayerNorm, readers: list[nn.Linear]) -> None:
    """``Linear(LN(x)) = Linear'(LN₀(x))`` with LN₀ affine-free: W' = W diag(γ), b' = b + W β."""
    gamma = _f64(norm.weight) if norm.weight is not None else None
    beta = _f64(norm.bias) if norm.bias is not None else None
    for lin in readers:
        w = _f64(lin.weight)
        if beta is not None:
            b = (_f64(lin.bias) if lin.bias is not None else w.new_zeros(w.shape[0])) + w @ beta
            if lin.bias is None:
                lin.bias = nn.Parameter(b.to(lin.weight.dtype).to(lin.weight.device))
            else:
                _assign(lin.bias, b)
        if gamma is not None:
            _assign(lin.weight, w * gamma)


def _fold_layerscale_into(ls: nn.Module, writer: nn.Linear) -> None:
    g = _f64(ls.gamma)
    _assign(writer.weight, _f64(writer.weight) * g.unsqueeze(1))
    if writer.bias is not None:
        _assign(writer.bias, _f64(writer.bias) * g)


def _rotate_writer(lin: nn.Linear, q: torch.Tensor) -> None:
    """Output ``y = x Wᵀ + b`` becomes ``(y - mean(y)) Q``: W' = Qᵀ(W - mean of rows), b' = (b - mean(b)) Q."""
    w = _centre_rows(_f64(lin.weight))
    _assign(lin.weight, q.t() @ w)
    if lin.bias is not None:
        b = _f64(lin.bias)
        _assign(lin.bias, (b - b.mean()) @ q)


def _rotate_reader(lin: nn.Linear, q: torch.Tensor) -> None:
    """``lin`` reads ``x Q``: W' = W Q."""
    _assign(lin.weight, _f64(lin.weight) @ q)


# ----------------------------------------------------------------------------- checks


def _check_model(model: nn.Module) -> None:
    if type(model) not in ROTATABLE_MODELS:
        raise UnsupportedModelError(f"rotation supports timm {', '.join(c.__name__ for c in ROTATABLE_MODELS)}, "
                                    f"not {type(model).__name__}")
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
        raise UnsupportedModelError("module 'attn_pool': residual rotation does not support attention pooling")
    norms = [m for m in (model.norm, model.fc_norm) if not isinstance(m, nn.Identity)]
    if len(norms) != 1 or not isinstance(norms[0], nn.LayerNorm):
        raise UnsupportedModelError("residual rotation needs exactly one final LayerNorm (norm or fc_norm)")
    for name, blk in model.blocks.named_children():
        for norm_name in ("norm1", "norm2"):
            if not isinstance(getattr(blk, norm_name), nn.LayerNorm):
                raise UnsupportedModelError(f"module 'blocks.{name}.{norm_name}': residual rotation needs a LayerNorm")
        for ls_name in ("ls1", "ls2"):
            if not isinstance(getattr(blk, ls_name), (nn.Identity, LayerScale)):
                raise UnsupportedModelError(f"module 'blocks.{name}.{ls_name}': unknown layer scale")


# ----------------------------------------------------------------------------- the three parts


def rotate_heads(attn: Attention, gen: torch.Generator, kind: str) -> None:
    """Per-head rotations of q, k (shared) and v (undone in proj), folded into qkv and proj."""
    h, d = attn.num_heads, attn.head_dim
    dim = h * d
    w = _f64(attn.qkv.weight)
    b = _f64(attn.qkv.bias) if attn.qkv.bias is not None else None
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
    _assign(attn.qkv.weight, w)
    if b is not None:
        _assign(attn.qkv.bias, b)
    _assign(attn.proj.weight, pw)


def rotate_fc2_input(mlp: Mlp, gen: torch.Generator, kind: str) -> None:
    """Insert an :class:`OnlineRotation` before fc2 and fold its transpose into fc2's weight."""
    rot = make_rotation(mlp.fc2.in_features, kind, gen)
    _rotate_reader(mlp.fc2, rot.dense().to(mlp.fc2.weight.device))
    mlp.norm = OnlineRotation(rot, mlp.fc2.weight.dtype, mlp.fc2.weight.device)


def rotate_residual(model: VisionTransformer, q: torch.Tensor) -> None:
    """Fold norms and LayerScale, centre the writers and rotate the residual stream by ``q``."""
    # Writers of the stream: patch embedding, prefix tokens, position embedding.
    conv = model.patch_embed.proj
    cw = _f64(conv.weight)
    shape = cw.shape
    cw = _centre_rows(cw.reshape(shape[0], -1))
    _assign(conv.weight, (q.t() @ cw).reshape(shape))
    if conv.bias is not None:
        cb = _f64(conv.bias)
        _assign(conv.bias, (cb - cb.mean()) @ q)
    for attr in ("cls_token", "reg_token", "dist_token", "pos_embed"):
        t = getattr(model, attr, None)
        if t is not None:
            v = _f64(t)
            _assign(t, (v - v.mean(-1, keepdim=True)) @ q)

    for blk in model.blocks:
        attn, mlp = blk.attn, blk.mlp
        _fold_norm_into(blk.norm1, [attn.qkv])
        _fold_norm_into(blk.norm2, [mlp.fc1])
        for ls, writer, ls_name in ((blk.ls1, attn.proj, "ls1"), (blk.ls2, mlp.fc2, "ls2")):
            if isinstance(ls, LayerScale):
                _fold_layerscale_into(ls, writer)
                setattr(blk, ls_name, nn.Identity())
        blk.norm1 = _rms_norm(blk.norm1)
        blk.norm2 = _rms_norm(blk.norm2)
        _rotate_reader(attn.qkv, q)
        _rotate_reader(mlp.fc1, q)
        _rotate_writer(attn.proj, q)
        _rotate_writer(mlp.fc2, q)

    heads = [model.head] + ([model.head_dist] if isinstance(model, VisionTransformerDistilled) else [])
    heads = [h for h in heads if isinstance(h, nn.Linear)]
    final_attr = "norm" if not isinstance(model.norm, nn.Identity) else "fc_norm"
    final = getattr(model, final_attr)
    _fold_norm_into(final, heads)
    setattr(model, final_attr, _rms_norm(final))
    for h in heads:
        _rotate_reader(h, q)


def apply_rotation(model: nn.Module, options: RotationOptions) -> nn.Module:
    """Rotate a float timm ViT in place (see the module docstring); returns it. Deterministic in ``options.seed``."""
    if not options.any:
        return model
    _check_model(model)
    if options.residual:
        _check_residual(model)
    gen = torch.Generator().manual_seed(options.seed)
    with torch.no_grad():
        if options.residual:
            q = make_rotation(model.embed_dim, options.kind, gen).dense()
            q = q.to(next(model.parameters()).device)
            rotate_residual(model, q)
        for blk in model.blocks:
            if options.heads:
                rotate_heads(blk.attn, gen, options.kind)
            if options.fc2:
                rotate_fc2_input(blk.mlp, gen, options.kind)
    logger.info("rotated %s: %s", type(model).__name__, options)
    return model

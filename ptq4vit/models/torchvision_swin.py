"""Adapter for torchvision's ``SwinTransformer``: Swin v1 (``swin_t``, ``swin_s``, ``swin_b``) and Swin V2
(``swin_v2_t``, ``swin_v2_s``, ``swin_v2_b``), one model class told apart by its block and patch-merging classes.

torchvision's window attention is a function (``shifted_window_attention``: pad, cyclic shift, window
partition, attention, reverse) called with the module's weights; :class:`QuantShiftedWindowAttention`
computes the same thing with the qkv and output projections and the two attention matmuls as sites.

Quantization sites (docs/method.md §1): the patch-embedding conv ``features.0.0``; in every block the
qkv projection, ``q @ kᵀ`` (V2: of the L2-normalised q and k, cosine attention), ``softmax @ v``, the
output projection and the MLP's two linear layers; each patch merging's ``reduction``; the classifier
``head``. Stays float: the relative position bias table (v1) or the continuous position bias MLP
``cpb_mlp`` (V2: Linear(2, 512), ReLU, Linear(512, heads) on the window's fixed coordinates, never an
activation), V2's clamped logit scale, the shift mask, norms, stochastic depth, dropouts, pooling.

V1 blocks are pre-norm (qkv and fc1 read a norm's output, smoothed if the preset says so); V2 blocks are
res-post-norm (qkv and fc1 read the residual stream itself: nothing to fold a smoothing divisor into).
V2 zeroes the k part of the qkv bias in every forward; the qkv site holds that zeroed bias.

The rotations (``rotq``) fold into v1 (:mod:`.torchvision_swin_rotation`); what they leave is planned too:
the stem's norm as a ``RotatedLayerNorm``, affine-free norms, the online rotation in the MLP's first
Dropout slot. A rotated model's window attention refuses a token grid that is not made of whole windows
(its padding zeros would meet norm1's shift folded into qkv's bias).

Refused, naming the module: any other block, attention, MLP or patch-merging class, a stray Linear or
Conv, the rotations on V2 and ``reparam_ln``, which has no layout here.

A torchvision model has no timm name: a checkpoint records ``torchvision_SwinTransformer`` and the
constructor arguments (the block and patch-merging classes by name; not ``stochastic_depth_prob``, whose
per-block rates are the identity in eval mode and cannot be read back exactly); ``load`` builds
``torchvision.models.SwinTransformer`` with them, never a builder with weights.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.swin_transformer import (PatchMerging, PatchMergingV2, ShiftedWindowAttention,
                                                 ShiftedWindowAttentionV2, SwinTransformer, SwinTransformerBlock,
                                                 SwinTransformerBlockV2)
from torchvision.ops.misc import MLP, Permute
from torchvision.ops.stochastic_depth import StochasticDepth

from ..errors import UserError
from ..nn import FloatMatMul, QuantLinear, QuantMatMul
from ..transforms.modules import RotatedLayerNorm
from ..transforms.rotation_layout import RotationLayout
from .adapter import DROPOUTS, NORMS, Adapter, SitePlan, child_paths
from .create_args import POSITIVE_INT, POSITIVE_INTS, POSITIVE_NUMBER, PROBABILITY, ArgKind, one_of
from .sites import SiteBuilder
from .swin_v2 import _check_cpb_mlp
from .torchvision_swin_rotation import torchvision_swin_rotation_layout
from .torchvision_vit import plan_torchvision_mlp

#: The model name a torchvision Swin's checkpoint records (a torchvision model carries no timm name).
TORCHVISION_SWIN = "torchvision_SwinTransformer"
#: torchvision's builders of this class, which ``create_model`` also takes (always with ``weights=None``).
SWIN_BUILDERS = ("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b")
#: The block and patch-merging classes a checkpoint names (``block=``, ``downsample_layer=``).
BLOCKS = {c.__name__: c for c in (SwinTransformerBlock, SwinTransformerBlockV2)}
MERGINGS = {c.__name__: c for c in (PatchMerging, PatchMergingV2)}
#: Each block class with the attention and patch-merging classes of its version.
_LAYOUTS = {SwinTransformerBlock: (ShiftedWindowAttention, PatchMerging),
            SwinTransformerBlockV2: (ShiftedWindowAttentionV2, PatchMergingV2)}
_PAIR = ArgKind("a list of two positive integers", lambda v: POSITIVE_INTS.accepts(v) and len(v) == 2)


def _shift_mask(pad_h: int, pad_w: int, window: list[int], shift: list[int], num_windows: int,
                like: torch.Tensor) -> torch.Tensor:
    """The shifted windows' mask (windows, n, n): -100 between tokens of different regions, as torchvision builds it."""
    mask = like.new_zeros((pad_h, pad_w))
    h_slices = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
    w_slices = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            mask[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    mask = mask.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    mask = mask.permute(0, 2, 1, 3).reshape(num_windows, window[0] * window[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, float(-100.0)).masked_fill(mask == 0, float(0.0))


class QuantShiftedWindowAttention(nn.Module):
    """Replacement for torchvision's ``ShiftedWindowAttention`` (Swin v1): ``shifted_window_attention``
    with the projections and both attention matmuls as sites; relative position bias and shift mask float.

    torchvision scales q before ``q @ kᵀ``; here the scale comes after the matmul so that the unscaled q
    and k are quantized (docs/method.md §1): with quantization off the outputs are bit-identical when the
    head dim is a power of four (the scale a power of two), else they differ by float rounding.

    ``whole_windows``: refuse a grid that needs padding to whole windows (a residual-rotated model, whose
    qkv bias holds norm1's folded shift: the padded zeros would become keys and values of that bias).
    """

    def __init__(self, attn: nn.Module, qkv: QuantLinear, proj: QuantLinear, matmul1: "QuantMatMul | FloatMatMul",
                 matmul2: "QuantMatMul | FloatMatMul", whole_windows: bool = False):
        super().__init__()
        self.whole_windows = whole_windows
        self.window_size = list(attn.window_size)
        self.shift_size = list(attn.shift_size)
        self.num_heads = attn.num_heads
        self.attention_dropout = attn.attention_dropout
        self.dropout = attn.dropout
        self.qkv = qkv
        self.matmul1 = matmul1
        self.matmul2 = matmul2
        self.proj = proj
        self._keep_position_bias(attn)

    def _keep_position_bias(self, attn: nn.Module) -> None:
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index)

    def relative_position_bias(self) -> torch.Tensor:
        """(1, heads, n, n), as torchvision computes it."""
        return self._bias_from_table(self.relative_position_bias_table)

    def _bias_from_table(self, table: torch.Tensor) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1]
        bias = table[self.relative_position_index].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``q @ kᵀ`` times the attention scale (a site: the first matmul)."""
        return self.matmul1(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        window = self.window_size
        pad_r = (window[1] - W % window[1]) % window[1]
        pad_b = (window[0] - H % window[0]) % window[0]
        if self.whole_windows and (pad_r or pad_b):
            raise UserError(f"a {H}x{W} token grid does not fill whole {window[0]}x{window[1]} windows, which the "
                            f"rotated model needs (the residual rotation folded norm1's shift into qkv's bias, "
                            f"which padded tokens would take up); use an image size whose grids fill whole windows")
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        _, pad_h, pad_w, _ = x.shape
        shift = [0 if window[i] >= (pad_h, pad_w)[i] else self.shift_size[i] for i in range(2)]
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        num_windows = (pad_h // window[0]) * (pad_w // window[1])
        x = x.view(B, pad_h // window[0], window[0], pad_w // window[1], window[1], C)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window[0] * window[1], C)

        n = x.size(1)
        qkv = self.qkv(x).reshape(x.size(0), n, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self.scores(q, k) + self.relative_position_bias()
        if sum(shift) > 0:
            mask = _shift_mask(pad_h, pad_w, window, shift, num_windows, x)
            attn = attn.view(x.size(0) // num_windows, num_windows, self.num_heads, n, n)
            attn = (attn + mask.unsqueeze(1).unsqueeze(0)).view(-1, self.num_heads, n, n)
        attn = F.dropout(F.softmax(attn, dim=-1), p=self.attention_dropout, training=self.training)
        x = self.matmul2(attn, v).transpose(1, 2).reshape(x.size(0), n, C)
        x = F.dropout(self.proj(x), p=self.dropout, training=self.training)

        x = x.view(B, pad_h // window[0], pad_w // window[1], window[0], window[1], C)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_h, pad_w, C)
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        return x[:, :H, :W, :].contiguous()


class QuantShiftedWindowAttentionV2(QuantShiftedWindowAttention):
    """Replacement for torchvision's ``ShiftedWindowAttentionV2``: cosine attention, ``normalize(q) @
    normalize(k)ᵀ`` a site, times the clamped logit scale; the continuous position bias MLP stays float."""

    def _keep_position_bias(self, attn: nn.Module) -> None:
        self.logit_scale = attn.logit_scale
        self.cpb_mlp = attn.cpb_mlp
        self.register_buffer("relative_coords_table", attn.relative_coords_table)
        self.register_buffer("relative_position_index", attn.relative_position_index)

    def relative_position_bias(self) -> torch.Tensor:
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        return 16 * torch.sigmoid(self._bias_from_table(table))

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        attn = self.matmul1(F.normalize(q, dim=-1), F.normalize(k, dim=-1).transpose(-2, -1))
        return attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()


def v2_qkv(attn: nn.Module) -> nn.Linear:
    """``attn.qkv`` with the k part of its bias zeroed, as ``shifted_window_attention`` uses it in V2 (the
    weight is the same tensor; the bias a copy)."""
    qkv = attn.qkv
    if qkv.bias is None:
        return qkv
    linear = nn.Linear(qkv.in_features, qkv.out_features, bias=False, device="meta")
    linear.weight = qkv.weight
    bias = qkv.bias.detach().clone()
    length = bias.numel() // 3
    bias[length:2 * length] = 0
    linear.bias = nn.Parameter(bias, requires_grad=qkv.bias.requires_grad)
    return linear


class TorchvisionSwinAdapter(Adapter):
    family = "torchvision SwinTransformer"
    model_classes = (SwinTransformer,)
    architectures = (TORCHVISION_SWIN, *SWIN_BUILDERS)
    create_args = dict(
        patch_size=_PAIR, embed_dim=POSITIVE_INT, depths=POSITIVE_INTS, num_heads=POSITIVE_INTS, window_size=_PAIR,
        mlp_ratio=POSITIVE_NUMBER, dropout=PROBABILITY, attention_dropout=PROBABILITY,
        stochastic_depth_prob=PROBABILITY, block=one_of(*BLOCKS), downsample_layer=one_of(*MERGINGS),
    )

    def model_name(self, model: nn.Module) -> str:
        return TORCHVISION_SWIN

    def blocks(self, model: nn.Module) -> list[str]:
        """``features.i.j``: the blocks of each stage (the odd ``features`` after the patch embedding)."""
        stages = [name for name, stage in model.features.named_children()
                  if any(isinstance(b, (SwinTransformerBlock, SwinTransformerBlockV2)) for b in stage.children())]
        return [p for name in stages for p in child_paths(model, f"features.{name}")]

    def head_features(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The final norm, then the average over the grid (what ``head`` reads)."""
        return lambda x: model.flatten(model.avgpool(model.permute(model.norm(x))))

    def create_model(self, name: str, **kwargs) -> nn.Module:
        """``torchvision.models.SwinTransformer(**kwargs)`` (block and patch merging named as strings), or a
        builder's architecture (never its weights)."""
        # torchvision keeps its sizes as lists (a checkpoint's JSON lists arrive as tuples)
        kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
        if name == TORCHVISION_SWIN:
            for key, classes in (("block", BLOCKS), ("downsample_layer", MERGINGS)):
                if key in kwargs:
                    if kwargs[key] not in classes:
                        raise ValueError(f"{key} must be one of {', '.join(classes)}, got {kwargs[key]!r}")
                    kwargs[key] = classes[kwargs[key]]
            return SwinTransformer(**kwargs)
        import torchvision.models

        return torchvision.models.get_model(name, weights=None, **kwargs)

    def common_create_kwargs(self, model: nn.Module) -> dict:
        return {"num_classes": model.num_classes}

    def create_kwargs(self, model: nn.Module) -> dict:
        conv = model.features[0][0]
        stages = [m for m in model.features[1:] if type(m) is nn.Sequential]
        blk = stages[0][0]
        fc1 = blk.mlp[0]
        merging = next((type(m).__name__ for m in model.features if type(m) in MERGINGS.values()), "PatchMerging")
        return dict(
            patch_size=list(conv.kernel_size), embed_dim=conv.out_channels, depths=[len(s) for s in stages],
            num_heads=[s[0].attn.num_heads for s in stages], window_size=list(blk.attn.window_size),
            mlp_ratio=fc1.out_features / fc1.in_features, dropout=blk.attn.dropout,
            attention_dropout=blk.attn.attention_dropout, block=type(blk).__name__, downsample_layer=merging,
        )

    def check_image_size(self, model: nn.Module, height: int, width: int, what: str = "images") -> None:
        # Any size the patch conv takes: the blocks pad to whole windows, patch merging to even sizes.
        kh, kw = model.features[0][0].kernel_size
        if height < kh or width < kw:
            raise UserError(f"{what} are {height}x{width} but the model takes images of at least its {kh}x{kw} patch")

    def plan(self, model: nn.Module, build: SiteBuilder) -> SitePlan:
        p = SitePlan(self.family)
        p.container("")
        p.container("features")
        stem = model.features[0]
        layout = (nn.Conv2d, Permute, (nn.LayerNorm, RotatedLayerNorm))
        if type(stem) is not nn.Sequential or len(stem) != 3 or not all(isinstance(m, t) for m, t in zip(stem, layout)):
            raise p.refuse("features.0", stem, "only torchvision's patch embedding (Conv2d, Permute, LayerNorm) is a "
                                               "known stem")
        p.container("features.0")
        p.site("features.0.0", stem[0], nn.Conv2d, build.patch_conv)
        p.keep_float("features.0.1", stem[1], (Permute,), "permute")
        p.keep_float("features.0.2", stem[2], (*NORMS, RotatedLayerNorm), "norm")
        # only the residual rotation turns the stem's norm into a RotatedLayerNorm
        whole_windows = type(stem[2]) is RotatedLayerNorm
        first = model.features[1][0] if len(model.features) > 1 and len(model.features[1]) else None
        version = _LAYOUTS.get(type(first))
        if version is None:
            raise p.refuse("features.1.0", first, "only torchvision's SwinTransformerBlock and SwinTransformerBlockV2 "
                                                  "are known block layouts")
        for i, stage in enumerate(model.features[1:], start=1):
            path = f"features.{i}"
            if i % 2 == 1:
                if type(stage) is not nn.Sequential:
                    raise p.refuse(path, stage, "a stage must be a Sequential of Swin blocks")
                p.container(path)
                for j, block in enumerate(stage):
                    self._plan_block(p, f"{path}.{j}", block, type(first), build, whole_windows)
            else:
                self._plan_merging(p, path, stage, version[1], build)
        p.keep_float("norm", model.norm, NORMS, "norm")
        p.keep_float("permute", model.permute, (Permute,), "permute")
        p.keep_float("avgpool", model.avgpool, (nn.AdaptiveAvgPool2d,), "pooling")
        p.keep_float("flatten", model.flatten, (nn.Flatten,), "flatten")
        p.site("head", model.head, nn.Linear, build.classifier)
        return p

    def _plan_merging(self, p: SitePlan, path: str, merging: nn.Module, expected: type, build: SiteBuilder) -> None:
        if type(merging) is not expected:
            raise p.refuse(path, merging, f"expected torchvision's {expected.__name__} here (the patch merging of "
                                          f"the blocks' Swin version)")
        p.container(path)
        p.keep_float(f"{path}.norm", merging.norm, NORMS, "norm")
        p.site(f"{path}.reduction", merging.reduction, nn.Linear, build.linear)

    def rotation_layout(self, model: nn.Module, residual: bool) -> RotationLayout:
        return torchvision_swin_rotation_layout(model, residual)

    def _plan_block(self, p: SitePlan, path: str, block: nn.Module, expected: type, build: SiteBuilder,
                    whole_windows: bool) -> None:
        if type(block) is not expected:
            raise p.refuse(path, block, f"expected torchvision's {expected.__name__} here (every block of one version)")
        v2 = expected is SwinTransformerBlockV2
        p.container(path)
        p.keep_float(f"{path}.norm1", block.norm1, NORMS, "norm")
        self._plan_attention(p, f"{path}.attn", block.attn, v2, build, whole_windows)
        p.keep_float(f"{path}.stochastic_depth", block.stochastic_depth, (StochasticDepth, *DROPOUTS),
                     "stochastic depth")
        p.keep_float(f"{path}.norm2", block.norm2, NORMS, "norm")
        if type(block.mlp) is not MLP:
            raise p.refuse(f"{path}.mlp", block.mlp, "only torchvision's MLP is a known MLP layout")
        # V2 is res-post-norm: fc1 reads the residual stream, no norm output to smooth
        fc1 = (lambda lin: build.linear(lin, asymmetric=True)) if v2 else build.normed_linear
        plan_torchvision_mlp(p, f"{path}.mlp", block.mlp, build, fc1=fc1)

    def _plan_attention(self, p: SitePlan, path: str, attn: nn.Module, v2: bool, build: SiteBuilder,
                        whole_windows: bool) -> None:
        expected = ShiftedWindowAttentionV2 if v2 else ShiftedWindowAttention
        if type(attn) is not expected:
            raise p.refuse(path, attn, f"only torchvision's {expected.__name__} is a known window attention layout "
                                       f"here; its matmuls would otherwise stay float")
        p.part(f"{path}.qkv", attn.qkv, (nn.Linear,), "the qkv projection")
        p.part(f"{path}.proj", attn.proj, (nn.Linear,), "the output projection")
        if v2:
            _check_cpb_mlp(p, f"{path}.cpb_mlp", attn.cpb_mlp, attn.num_heads)
            p.replaced_with_parts(path, lambda a: QuantShiftedWindowAttentionV2(
                a, build.linear(v2_qkv(a), w_groups=3, asymmetric=True), build.linear(a.proj),
                *build.attention_matmuls(a.num_heads, a.qkv)))
        else:
            p.replaced_with_parts(path, lambda a: QuantShiftedWindowAttention(
                a, build.qkv_linear(a.qkv), build.linear(a.proj), *build.attention_matmuls(a.num_heads, a.qkv),
                whole_windows=whole_windows))

"""Quantizer modules: the calibrated parameters of one operand, applied as fake quantization.

A quantizer owns its scales (buffers, so they travel with ``state_dict``) and knows how they
map onto the operand it quantizes; the arithmetic lives in :mod:`.uniform` and :mod:`.twin`.
Every kind answers the same questions (:class:`Quantizer`): its spec, its reported parameters,
its codes, the memory its fake quantization takes and the space its parameter is searched in,
so code elsewhere asks the quantizer instead of testing its class (what belongs to another
layer, such as an integer lowering, is registered there per kind: :mod:`.registry`).
``enabled = False`` makes a quantizer the identity (the float model); calibration writes the
scales and sets ``calibrated``.

Scales follow the model's device but stay float32 when the model changes dtype
(``model.to(torch.bfloat16)``): rounding a scale to half precision would change the
quantization grid the search chose.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import nn

from .asymmetric import asymmetric_codes, asymmetric_dequantize, asymmetric_fake_quant, range_to_step
from .search_space import ScaleSearch
from .twin import (SoftmaxTwinForm, gelu_twin_fake_quant, gelu_twin_neg_step, pow2_candidates, softmax_split_candidates,
                   softmax_top_candidates, softmax_twin_fake_quant)
from .uniform import check_bits, initial_scale, uniform_codes, uniform_dequantize, uniform_fake_quant


def floats(t: torch.Tensor) -> list[float]:
    """A tensor's values as a flat list of Python floats (JSON)."""
    return [float(v) for v in t.detach().reshape(-1).cpu()]


def group_view(x: torch.Tensor, axis: Optional[int], groups: int) -> torch.Tensor:
    """View ``x`` with dim ``axis`` split into ``(groups, size // groups)`` (unchanged if axis is None)."""
    if axis is None:
        return x
    axis = axis % x.dim()
    size = x.shape[axis]
    if size % groups:
        raise ValueError(f"cannot split dim {axis} of size {size} into {groups} equal quantization groups")
    return x.reshape(*x.shape[:axis], groups, size // groups, *x.shape[axis + 1:])


def scale_view(scale: torch.Tensor, axis: Optional[int], ndim: int) -> torch.Tensor:
    """Shape a ``(groups,)`` scale to broadcast against ``group_view(x, axis, groups)`` of an ``ndim``-dim x."""
    if axis is None:
        return scale
    axis = axis % ndim
    return scale.reshape(*([1] * axis), -1, *([1] * (ndim - axis)))


class Quantizer(nn.Module):
    """Base class: identity while disabled, an error if enabled before calibration.

    What every kind answers (a new kind overrides what differs from these defaults):

    * :meth:`spec`: its kind as JSON data (checkpoints store it in their structure);
    * :meth:`qparams`: its calibrated parameters for the qparams report;
    * :meth:`codes` / :meth:`dequantize`: the integers it rounds to and their values;
    * :meth:`search_bytes`: the memory its fake quantization takes while a search scores it;
    * :meth:`scale_search`: where the search of its parameter starts, and how it is stored.
    """

    #: Operand-sized float32 tensors its fake quantization keeps alive at once (the calibration's
    #: memory plan counts :meth:`search_bytes`): x / Δ and its rounding for a uniform quantizer.
    search_copies: ClassVar[int] = 2
    #: True: one parameter for the whole operand, which the search scores on the whole product at
    #: once (all heads of an attention operand); False: one per group, each scored on its own.
    whole_operand_search: ClassVar[bool] = False

    #: Buffers that are steps (a scale, the GELU twin's negative step, the softmax split and top): each value
    #: must be finite and positive (ptq4vit.finite); any other floating buffer (a zero point) finite.
    positive_buffers: tuple[str, ...] = ("scale", "neg_scale", "split", "top")

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_bits(bits)
        self.enabled = True
        self.calibrated = False

    def _apply(self, fn, *args, **kwargs):  # (torch >= 2.1 adds recurse=; pass whatever comes)
        # Module.to/half/bfloat16/cuda all funnel through _apply. Float32 buffers (the scales)
        # take only the device of a dtype conversion, never its dtype.
        kept = {}
        for name, buf in self._buffers.items():
            if buf is not None and buf.dtype == torch.float32:
                target = fn(torch.zeros((), dtype=torch.float32, device=buf.device))
                if target.dtype != torch.float32:
                    kept[name] = buf.to(device=target.device)
        super()._apply(fn, *args, **kwargs)
        self._buffers.update(kept)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self.calibrated:
            raise RuntimeError(f"{type(self).__name__} is enabled but was never calibrated; run ptq4vit.quantize first")
        return self.fake_quant(x)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def spec(self) -> dict:
        """Its kind as plain JSON data: ``{"type": class name, "bits": b}`` and the fields that set its
        arithmetic (:meth:`spec_fields`). Checkpoints store it (their ``structure``) and compare it on
        load, so a kind's spec must not change once checkpoints carry it."""
        return {"type": type(self).__name__, "bits": self.bits, **self.spec_fields()}

    def spec_fields(self) -> dict:
        """The fields of :meth:`spec` beyond type and bits (none by default)."""
        return {}

    def qparams(self, role: str) -> dict:
        """Its calibrated parameters as JSON values, keyed ``<role>_<name>`` (role ``"w"``, ``"a"`` or
        ``"b"``): by default every float buffer as a list."""
        return {f"{role}_{name}": floats(buf) for name, buf in self._buffers.items()
                if buf is not None and buf.is_floating_point()}

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes of ``x`` (float32 values, shape of x): what :meth:`fake_quant` rounds to."""
        raise NotImplementedError(f"{type(self).__name__} has no single tensor of codes")

    def dequantize(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The values of :meth:`codes`, rounded once to ``dtype``."""
        raise NotImplementedError(f"{type(self).__name__} has no single tensor of codes")

    def search_bytes(self, operand_bytes: int) -> int:
        """Bytes its fake quantization of an operand of ``operand_bytes`` (float32) holds at once."""
        return self.search_copies * operand_bytes

    def scale_search(self, x: torch.Tensor) -> Optional[ScaleSearch]:
        """The search space of its parameter on the operand ``x`` (float32, all calibration rows);
        None when it has nothing to search."""
        return None

    def clip_search(self, x: torch.Tensor) -> Optional[ScaleSearch]:
        """A second parameter, searched with the first fixed (then the first again with it): None when
        it has none."""
        return None


class GroupedQuantizer(Quantizer):
    """Base of the uniform quantizers: ``groups`` steps (``scale``) along dim ``axis`` of the operand.

    ``axis=None``: one step for the tensor. ``axis=0`` on a weight: contiguous blocks of output
    rows (``groups=3`` gives the q/k/v blocks of a fused qkv projection; ``groups=out`` is per
    channel). ``axis=1`` on a ``(B, heads, ...)`` attention operand: one step per head; ``axis=-1``
    on an activation: one per channel (its last dim).
    """

    def __init__(self, bits: int, groups: int = 1, axis: Optional[int] = None, device: Optional[torch.device] = None):
        super().__init__(bits)
        if axis is None and groups != 1:
            raise ValueError("a per-tensor quantizer (axis=None) has exactly one group")
        self.groups = groups
        self.axis = axis
        self.register_buffer("scale", torch.ones(groups, dtype=torch.float32, device=device))

    def spec_fields(self) -> dict:
        return {"groups": self.groups, "axis": self.axis}

    def group_absmax(self, x: torch.Tensor) -> torch.Tensor:
        """``max |x|`` of each group, shape ``(groups,)`` (``(1,)`` per tensor), without a copy of a grouped x."""
        if self.axis is None:
            return x.abs().max().reshape(1)
        xg = group_view(x, self.axis, self.groups)
        axis = self.axis % x.dim()
        dims = tuple(d for d in range(xg.dim()) if d != axis)
        return torch.maximum(xg.amax(dims), xg.amin(dims).neg())


class UniformQuantizer(GroupedQuantizer):
    """Symmetric uniform quantizer with ``groups`` scales along dim ``axis`` of its operand (see
    :class:`GroupedQuantizer`)."""

    def set_scale(self, scale: torch.Tensor) -> None:
        self.scale.copy_(scale.reshape(self.groups))
        self.calibrated = True

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` (float32 values, shape of x): what :meth:`fake_quant` rounds to."""
        xg = group_view(x, self.axis, self.groups)
        return uniform_codes(xg, scale_view(self.scale, self.axis, x.dim()), self.bits).reshape(x.shape)

    def dequantize(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``codes · Δ`` rounded once to ``dtype`` (``codes`` may be an integer tensor)."""
        cg = group_view(codes, self.axis, self.groups)
        return uniform_dequantize(cg, scale_view(self.scale, self.axis, codes.dim()), dtype).reshape(codes.shape)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        # Codes then dequantize, the two halves a checkpoint stores and reloads: equal by construction.
        return self.dequantize(self.codes(x), x.dtype)

    def scale_search(self, x: torch.Tensor) -> ScaleSearch:
        """Candidates around ``Δ0 = max|x| / (qmax - 0.5)`` of each group (docs/method.md §2)."""
        bits = self.bits
        return ScaleSearch(lambda t, s: uniform_fake_quant(t, s, bits), self.set_scale,
                           start=initial_scale(self.group_absmax(x), bits))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, groups={self.groups}, axis={self.axis}"


class AsymmetricQuantizer(GroupedQuantizer):
    """Asymmetric uniform quantizer (a step and a zero point per group), RepQ-ViT's kind (docs/lowbit.md §6).

    Groups as in :class:`GroupedQuantizer`. Codes are signed (:mod:`.asymmetric`), so a weight's
    codes are stored as int8 like the symmetric ones. Deliberately not a UniformQuantizer: code that
    lowers symmetric codes must not take it for one.
    """

    def __init__(self, bits: int, groups: int = 1, axis: Optional[int] = None, device: Optional[torch.device] = None):
        super().__init__(bits, groups, axis, device)
        self.register_buffer("zero_point", torch.zeros(groups, dtype=torch.float32, device=device))

    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale.copy_(scale.reshape(self.groups))
        self.zero_point.copy_(zero_point.reshape(self.groups))
        self.calibrated = True

    def _views(self, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        return scale_view(self.scale, self.axis, ndim), scale_view(self.zero_point, self.axis, ndim)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Signed integer codes of ``x`` (float32 values, shape of x)."""
        scale, zp = self._views(x.dim())
        return asymmetric_codes(group_view(x, self.axis, self.groups), scale, zp, self.bits).reshape(x.shape)

    def dequantize(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(codes - z) · Δ`` rounded once to ``dtype``."""
        scale, zp = self._views(codes.dim())
        return asymmetric_dequantize(group_view(codes, self.axis, self.groups), scale, zp, dtype).reshape(codes.shape)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp = self._views(x.dim())
        return asymmetric_fake_quant(group_view(x, self.axis, self.groups), scale, zp, self.bits).reshape(x.shape)

    def scale_search(self, x: torch.Tensor) -> ScaleSearch:
        """A per-tensor quantizer's step: the range ``[min(x, 0), max(x, 0)]`` on all ``2^b`` codes fixes
        the zero point (an integer, so zero is a code); the candidates scale the step, shrinking the
        range towards zero on both sides in proportion (docs/deployment.md)."""
        if self.axis is not None:
            raise NotImplementedError(f"a scale search of a per-group {type(self).__name__} (axis={self.axis})")
        bits = self.bits
        start, zp = range_to_step(x.min().clamp(max=0).reshape(1), x.max().clamp(min=0).reshape(1), bits)
        return ScaleSearch(lambda t, s: asymmetric_fake_quant(t, s, zp, bits), lambda s: self.set_params(s, zp),
                           start=start)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, groups={self.groups}, axis={self.axis}, zero_point=True"


class TwinSoftmaxQuantizer(Quantizer):
    """Twin uniform quantizer for post-softmax values; one split ``s = 2^-i`` per layer, and with
    ``top`` a searched top ``t`` of the range (values above it clip; docs/lowbit.md §12)."""

    #: mask, both regions and their temporaries
    search_copies = 5
    whole_operand_search = True

    def __init__(self, bits: int, form: SoftmaxTwinForm = "select", top: bool = False,
                 device: Optional[torch.device] = None):
        super().__init__(bits)
        if form not in ("select", "sum"):
            raise ValueError(f"softmax twin form must be 'select' or 'sum', got {form!r}")
        if top and form != "select":
            raise ValueError("a softmax twin top is a setting of the 'select' form only")
        self.form = form
        self.has_top = top
        self.register_buffer("split", torch.ones((), dtype=torch.float32, device=device))
        if top:  # only then: a twin without a top keeps the tensors (and checkpoints) it always had
            self.register_buffer("top", torch.ones((), dtype=torch.float32, device=device))

    def set_split(self, split: torch.Tensor) -> None:
        self.split.copy_(split.reshape(()))
        self.calibrated = True

    def set_top(self, top: torch.Tensor) -> None:
        self.top.copy_(top.reshape(()))

    def current_top(self) -> Optional[torch.Tensor]:
        """The top ``t`` (None without one: the range ends at 1)."""
        return self.top if self.has_top else None

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return softmax_twin_fake_quant(x, self.split, self.bits, self.form, self.current_top())

    def spec_fields(self) -> dict:
        return {"form": self.form, **({"top": True} if self.has_top else {})}

    def qparams(self, role: str) -> dict:
        return {"split": float(self.split), **({"top": float(self.top)} if self.has_top else {})}

    def scale_search(self, x: torch.Tensor) -> ScaleSearch:
        """The splits ``2^-i`` (docs/method.md §3), whatever the data, at the current top."""
        bits, form = self.bits, self.form
        return ScaleSearch(lambda t, s: softmax_twin_fake_quant(t, s, bits, form, self.current_top()), self.set_split,
                           fixed=softmax_split_candidates().to(x.device).reshape(-1, 1))

    def clip_search(self, x: torch.Tensor) -> Optional[ScaleSearch]:
        """With a top, the tops ``2^(-j/2)`` at the current split (docs/lowbit.md §12)."""
        if not self.has_top:
            return None
        bits = self.bits
        return ScaleSearch(lambda t, top: softmax_twin_fake_quant(t, self.split, bits, "select", top), self.set_top,
                           fixed=softmax_top_candidates().to(x.device).reshape(-1, 1))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, form={self.form}" + (", top=True" if self.has_top else "")


class PostGeluQuantizer(Quantizer):
    """A quantizer of post-GELU values: one searched ``scale`` for the positive side and the GELU
    twin's fixed negative step ``neg_scale`` (Δ-), which covers GELU's small negative range."""

    def __init__(self, bits: int, device: Optional[torch.device] = None):
        super().__init__(bits)
        self.register_buffer("scale", torch.ones(1, dtype=torch.float32, device=device))
        self.register_buffer("neg_scale", torch.tensor(gelu_twin_neg_step(bits), dtype=torch.float32, device=device))

    def set_scale(self, scale: torch.Tensor) -> None:
        self.scale.copy_(scale.reshape(1))
        self.calibrated = True

    def qparams(self, role: str) -> dict:
        return {f"{role}_scale": floats(self.scale), f"{role}_neg_scale": float(self.neg_scale)}


class TwinGeluQuantizer(PostGeluQuantizer):
    """Twin uniform quantizer for post-GELU values: fixed Δ- and a searched Δ+.

    With ``pow2=True`` the search only considers ``Δ+ = 2^m Δ-``, so integer kernels can
    align the two parts with a shift.
    """

    #: both twin halves
    search_copies = 3

    def __init__(self, bits: int, pow2: bool = False, device: Optional[torch.device] = None):
        super().__init__(bits, device)
        self.pow2 = pow2

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_twin_fake_quant(x, self.scale, self.neg_scale, self.bits)

    def spec_fields(self) -> dict:
        return {"pow2": self.pow2}

    def scale_search(self, x: torch.Tensor) -> ScaleSearch:
        """Δ+ around ``max(x) / (qmax - 0.5)`` (the signed max: the positive range); with ``pow2`` only
        the candidates ``2^m Δ-``."""
        neg, bits = self.neg_scale.to(x), self.bits
        return ScaleSearch(lambda t, s: gelu_twin_fake_quant(t, s, neg, bits), self.set_scale,
                           start=initial_scale(x.max().reshape(1), bits),
                           restrict=(lambda c: pow2_candidates(c, neg)) if self.pow2 else None)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, pow2={self.pow2}"

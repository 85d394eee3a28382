"""What every lowering shares: the site's integers, computed as fake quantization computes them,
the node emitter, and the traced stand-in that puts a lowering into torch's ONNX exporter.

A lowering is one quantization site written as ONNX nodes. Two families exist: :mod:`.contrib`
(ONNX Runtime's ``com.microsoft`` integer GEMMs) and :mod:`.qdq` (standard
``QuantizeLinear``/``DequantizeLinear`` pairs that runtimes fuse into integer kernels). Both start
from the numbers here, so both give the codes the torch model rounds to.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..quant import (AsymmetricQuantizer, KindRegistry, TwinGeluQuantizer, TwinSoftmaxQuantizer, softmax_twin_steps,
                     UniformQuantizer, qmax)
from .report import SiteExport

INT32_LIMIT = 2 ** 31 - 1


def f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def weight_codes(site) -> torch.Tensor:
    """The weight's integer codes (float32 on the CPU, shaped like the weight): the quantizer's own,
    so the graph holds exactly what the fake-quantized forward and a checkpoint round to."""
    return site.w_quant.codes(site.weight.detach()).float().cpu()


@dataclass(frozen=True)
class LinearInput:
    """A linear layer's per-tensor input codes ``clamp(round(x/Δ) + z, -q, q-1)``, value ``(c - z)·Δ``:
    symmetric (``z = 0``) or asymmetric with an integer zero point ``z`` (which ``QuantizeLinear``
    takes as it is: int8 codes with zero point ``z`` are exactly these)."""
    integer_form: ClassVar[str] = "uniform"
    bits: int
    scale: float
    zero_point: int

    @staticmethod
    def _per_tensor(aq) -> None:
        if aq.groups != 1:
            raise NotImplementedError(f"input quantizer {type(aq).__name__} with {aq.groups} groups "
                                      f"(only per-tensor inputs have an integer lowering)")

    @classmethod
    def of_uniform(cls, aq: UniformQuantizer) -> "LinearInput":
        cls._per_tensor(aq)
        return cls(aq.bits, float(aq.scale.detach().float().cpu()[0]), 0)

    @classmethod
    def of_asymmetric(cls, aq: AsymmetricQuantizer) -> "LinearInput":
        cls._per_tensor(aq)
        z = float(aq.zero_point.detach().float().cpu()[0])
        q = qmax(aq.bits)
        if z != round(z) or not -q <= z <= q - 1:
            raise NotImplementedError(f"asymmetric input with zero point {z} (an integer code in [{-q}, {q - 1}] "
                                      f"is needed for integer kernels)")
        return cls(aq.bits, float(aq.scale.detach().float().cpu()[0]), int(z))

    @property
    def code_range(self) -> tuple[float, float]:
        """The float values of the lowest and highest code, ``(-q - z)·Δ`` and ``(q - 1 - z)·Δ``."""
        q, z, s = qmax(self.bits), self.zero_point, np.float32(self.scale)
        return float((-q - z) * s), float((q - 1 - z) * s)


def column_scales(wq: UniformQuantizer, out_features: int) -> np.ndarray:
    """Δw of each output column (per q/k/v block or per channel, repeated over the block)."""
    s = wq.scale.detach().float().cpu().numpy()
    return np.repeat(s, out_features // wq.groups).astype(np.float32)


def pow2_exponent(ratio: float) -> Optional[int]:
    """``m`` with ``ratio == 2^m`` exactly, else None."""
    if not ratio > 0 or not math.isfinite(ratio):
        return None
    m, e = math.frexp(ratio)
    return e - 1 if m == 0.5 else None


@dataclass(frozen=True)
class GeluTwin:
    """Post-GELU twin: ``pos = clamp(round(x/Δ+), 0, q-1)``, ``neg = clamp(round(x/Δ-), -q, 0)``."""
    integer_form: ClassVar[str] = "gelu_twin"
    bits: int
    pos_step: float
    neg_step: float
    pow2: Optional[int]       # m with Δ+ = 2^m Δ-, or None for a free Δ+

    @classmethod
    def of(cls, aq: TwinGeluQuantizer) -> "GeluTwin":
        pos = float(aq.scale.detach().float().cpu()[0])
        neg = float(aq.neg_scale.detach().float().cpu())
        return cls(aq.bits, pos, neg, pow2_exponent(pos / neg) if pos != 0 else None)


@dataclass(frozen=True)
class SoftmaxTwin:
    """Post-softmax twin with split ``s = 2^-i``: ``lo`` codes (step ``Δ_R1 = s/levels``) and ``hi``
    codes (step ``Δ_R2 = 1/levels = 2^i Δ_R1``), as :func:`ptq4vit.quant.twin.softmax_twin_codes`;
    with a top ``t`` both steps are ``t`` times these, the regions meet at ``threshold = s·t`` and the
    ``hi`` codes stop at ``levels`` (``clip_hi``)."""
    integer_form: ClassVar[str] = "softmax_twin"
    bits: int
    form: str
    split: float
    step_lo: float
    step_hi: float
    shift: int                # i
    lo_max: int               # sum form: the lo code of every x >= s
    hi_min: int               # sum form: the hi code of every x <= s
    threshold: float = 0.0    # where the regions meet: s, or s·t with a top
    clip_hi: bool = False     # a top: values above it take the largest hi code
    # The sum form (``official``) keeps the released code's ``hi = round(x·(qmax-1))``; the
    # lowerings multiply by ``levels`` and quantize with step 1 there, so the codes stay torch's.

    @property
    def levels(self) -> int:
        return qmax(self.bits) - 1

    @classmethod
    def of(cls, aq: TwinSoftmaxQuantizer) -> "SoftmaxTwin":
        levels = qmax(aq.bits) - 1
        split = aq.split.detach().float().cpu()
        top = aq.current_top()
        top = None if top is None else top.detach().float().cpu()
        step_lo, step_hi = softmax_twin_steps(split, aq.bits, top)       # as torch computes them
        i = pow2_exponent(float(step_hi) / float(step_lo))
        if i is None or i < 0:  # Δ_R2 / Δ_R1 = 1/s = 2^i by construction
            raise NotImplementedError(f"softmax twin with a split that is not a power of two ({float(split)})")
        threshold = split if top is None else split * top
        return cls(aq.bits, aq.form, float(split), float(step_lo), float(step_hi), i,
                   int(torch.round(split / step_lo).clamp(0, levels)), int(torch.round(split * levels)),
                   float(threshold), top is not None)


@dataclass(frozen=True)
class HeadOperand:
    """An attention operand's symmetric codes ``clamp(round(x/Δ), -q, q-1)``, one Δ per head along
    ``axis`` (None: one Δ for the operand)."""
    integer_form: ClassVar[str] = "uniform"
    bits: int
    groups: int
    axis: Optional[int]
    scale: np.ndarray

    @classmethod
    def of(cls, q: UniformQuantizer) -> "HeadOperand":
        return cls(q.bits, q.groups, q.axis if q.groups > 1 else None, f32(q.scale.detach().float().cpu().numpy()))


# What each quantizer kind lowers to, by role; a kind without a handler is exported as a float
# fallback (its site's own fake-quantized float ops), the reason naming the role and the kind.
#: Weight of a linear site: the per-output-column Δw of its int8 codes.
LINEAR_WEIGHTS: KindRegistry = KindRegistry("weight quantizer")
LINEAR_WEIGHTS.register(UniformQuantizer, column_scales)
#: Input of a linear site.
LINEAR_INPUTS: KindRegistry = KindRegistry("input quantizer")
LINEAR_INPUTS.register(UniformQuantizer, LinearInput.of_uniform)
LINEAR_INPUTS.register(AsymmetricQuantizer, LinearInput.of_asymmetric)
LINEAR_INPUTS.register(TwinGeluQuantizer, GeluTwin.of)
#: Left operand of an attention matmul.
MATMUL_A: KindRegistry = KindRegistry("operand A quantizer")
MATMUL_A.register(UniformQuantizer, HeadOperand.of)
MATMUL_A.register(TwinSoftmaxQuantizer, SoftmaxTwin.of)
#: Right operand of an attention matmul.
MATMUL_B: KindRegistry = KindRegistry("operand B quantizer")
MATMUL_B.register(UniformQuantizer, HeadOperand.of)


def integer_linear(site) -> tuple[np.ndarray, "LinearInput | GeluTwin"]:
    """Δw per output column and the input's integer form of a linear site; NotImplementedError (the
    site is then exported as a float fallback) where its kinds have none: asymmetric weights, and
    RepQ-ViT's per-channel or fractional zero points (docs/lowbit.md §6), among others."""
    col_scale = LINEAR_WEIGHTS.get(site.w_quant)(site.w_quant, site.out_features)
    return col_scale, LINEAR_INPUTS.get(site.a_quant)(site.a_quant)


def integer_matmul(site) -> tuple["HeadOperand | SoftmaxTwin", HeadOperand]:
    """The integer forms of an attention matmul's operands (B is looked at first); NotImplementedError where none."""
    b = MATMUL_B.get(site.b_quant)(site.b_quant)
    return MATMUL_A.get(site.a_quant)(site.a_quant), b


def frozen_copy(q: nn.Module) -> nn.Module:
    """A copy of a quantizer whose buffers are plain tensors (no autograd history)."""
    c = copy.copy(q)
    c._buffers = {k: None if v is None else v.detach().clone() for k, v in q._buffers.items()}
    c._parameters = {k: None if v is None else v.detach().clone() for k, v in q._parameters.items()}
    c._modules = {}
    return c


class Emitter:
    """Thin helper around the exporter's graph context."""

    def __init__(self, g):
        self.g = g

    def const(self, arr) -> "torch._C.Value":
        return self.g.op("Constant", value_t=torch.from_numpy(np.ascontiguousarray(arr)))

    def op(self, name: str, *args, **attrs):
        return self.g.op(name, *args, **attrs)

    def quantize(self, x, scale, zero_point, axis: Optional[int] = None, clip: Optional[tuple] = None):
        """QuantizeLinear (round half to even of ``x / scale``, saturating) with an optional integer clip."""
        attrs = {} if axis is None else {"axis_i": axis}
        y = self.op("QuantizeLinear", x, self.const(scale), self.const(zero_point), **attrs)
        if clip is not None:
            dt = np.asarray(zero_point).dtype
            y = self.op("Clip", y, self.const(np.asarray(clip[0], dt)), self.const(np.asarray(clip[1], dt)))
        return y

    def dequantize(self, x, scale, zero_point, axis: Optional[int] = None):
        attrs = {} if axis is None else {"axis_i": axis}
        return self.op("DequantizeLinear", x, self.const(scale), self.const(zero_point), **attrs)

    def cast_float(self, x):
        return self.op("Cast", x, to_i=1)  # TensorProto.FLOAT


class Lowering:
    """One site's lowering: numbers prepared eagerly, ONNX nodes emitted by the exporter
    (:meth:`emit`); :meth:`torch_forward` is what the traced graph computes meanwhile."""

    site_export: SiteExport
    out_shape: tuple = ()

    def __init__(self, site: nn.Module):
        # What the site computes, from private copies: this runs inside a traced
        # autograd.Function, where the model's own parameters and buffers must not appear.
        if "w_quant" not in site.quantizers():  # two operands, no weight: an attention matmul
            if site.renorm_rows:
                raise NotImplementedError("row renormalization of the quantized softmax (softmax_renorm)")
            self._aq, self._bq = frozen_copy(site.a_quant), frozen_copy(site.b_quant)
        else:
            self._aq = frozen_copy(site.a_quant)
            with torch.no_grad():
                self._w = frozen_copy(site.w_quant).fake_quant(site.weight.detach().clone())
            self._bias = None if site.bias is None else site.bias.detach().clone()
            self._smooth = None if site.smooth is None else site.smooth.detach().clone()

    def torch_forward(self, *args):
        if len(args) == 2:
            out = self._aq.fake_quant(args[0]) @ self._bq.fake_quant(args[1])
        else:
            x = args[0] if self._smooth is None else args[0] / self._smooth
            out = F.linear(self._aq.fake_quant(x), self._w, self._bias)
        self.out_shape = tuple(out.shape)
        return out

    def uses_contrib_ops(self) -> bool:
        return False

    def smoothed_input(self, e: "Emitter", x):
        """``x / s`` for a linear site with a smoothing divisor (a ``Div``, as torch computes it), else ``x``."""
        if getattr(self, "_smooth", None) is None:
            return x
        return e.op("Div", x, e.const(f32(self._smooth.float().cpu().numpy())))

    def emit(self, e: Emitter, *inputs):
        raise NotImplementedError


def _set_type(out, like, shape) -> None:
    sizes = [None] + list(shape[1:])
    out.setType(like.type().with_dtype(torch.float32).with_sizes(sizes))


class _Site1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, low):
        return low.torch_forward(x)

    @staticmethod
    def symbolic(g, x, low):
        out = low.emit(Emitter(g), x)
        _set_type(out, x, low.out_shape)
        return out


class _Site2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, low):
        return low.torch_forward(a, b)

    @staticmethod
    def symbolic(g, a, b, low):
        out = low.emit(Emitter(g), a, b)
        _set_type(out, a, low.out_shape)
        return out


def traced_forward(low: Lowering, n_inputs: int):
    """A forward for the site's module that the exporter records as ``low``'s nodes."""
    if n_inputs == 2:
        return lambda a, b: _Site2.apply(a, b, low)
    return lambda x: _Site1.apply(x, low)


def act_encoding(bits: int, zero_point: int = 0):
    """Zero point, clip and narrowness of a uniform activation (symmetric, or with an integer zero
    point ``z``) stored as uint8 ``code + qmax`` (its zero point ``z + qmax``)."""
    q = qmax(bits)
    clip = None if bits == 8 else (0, 2 * q - 1)
    return np.uint8(q + zero_point), clip, 2 * q - 1 <= 128

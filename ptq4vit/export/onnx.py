"""ONNX export with integer semantics.

:func:`export_onnx` writes a :class:`~ptq4vit.quantized.QuantizedModel` as an ONNX graph in
which every quantized operand is an 8-bit integer tensor (``QuantizeLinear``: round half to
even of ``x / Δ``, exactly torch's rounding) and every quantized product is an integer matmul
that ONNX Runtime runs with its int8 GEMM kernels (MLAS); the int32 accumulators are scaled
back to float in the GEMM's output stage (``com.microsoft.MatMulIntegerToFloat``):

* linear layers: ``QuantizeLinear`` of the input, ``MatMulIntegerToFloat`` on the weight codes
  with output scale ``Δx·Δw`` (per q/k/v block or channel) and the bias;
* ``q @ kᵀ``: both operands quantized per head, one integer matmul, one float multiply by
  ``Δq·Δk·attn_scale`` per head;
* ``softmax @ v`` with the twin quantizer: the probabilities become two uint8 code tensors,
  ``lo`` (``x < s``, step ``Δ_R1``) and ``hi`` (``x >= s``, step ``Δ_R2 = 2^i Δ_R1``), two integer
  matmuls with the codes of v, ``lo@v + 2^i·(hi@v)``, times ``Δ_R1·Δv`` per head. The ``2^i``
  is applied as the hi GEMM's output scale (an exponent shift: while the accumulators stay below
  2^24, which the exporter checks, this is bit-identical to an int32 shift-add and one cast), or,
  with ``twin_combine="int32"``, as an int32 multiply-add before one cast. The released code's
  ``hi + lo`` ("sum", ``official``) form has the same integer structure with clamped codes.
* ``fc2`` with the post-GELU twin quantizer: ``pos`` (step ``Δ+``) and ``neg`` (step ``Δ-``) codes,
  two integer matmuls against the weight codes whose output scales are ``Δ+·Δw`` and ``Δ-·Δw``
  (``2^m`` apart with the ``ptq4vit`` preset's power-of-two Δ+; ``int32`` combine then shifts in
  int32). With a free Δ+ (``official``) the same two integer matmuls are combined in float.

Which int8 GEMM ORT uses matters for exactness. On x86 without VNNI, MLAS's u8×s8 kernel
(``vpmaddubsw``) saturates pair sums at int16, so a full-range uint8 operand times int8 weights
can be silently wrong; u8×u8 (16-bit path) is exact everywhere, and u8×s8 is exact everywhere
when the unsigned operand is at most 128 (the twin codes always are, and 7-bit or narrower
symmetric codes stored as ``code + 2^(b-1)``). ``gemm="portable"`` (default) uses u8×s8 only
where that holds and u8×u8 elsewhere; ``gemm="vnni"`` uses u8×s8 everywhere (exact and fastest
on CPUs with AVX512-VNNI/AVX-VNNI; wrong on AVX2-only CPUs); ``gemm="auto"`` picks ``vnni`` when
the exporting CPU has VNNI.

What stays float is what the method keeps float (LayerNorm, softmax, GELU, residuals, biases,
embeddings) plus the sites listed in :attr:`ExportReport.fallbacks`: the patch embedding (its
input is the float image, docs/method.md §1: the weight is dequantized from its int8 codes and the conv
runs in float) and any site whose quantizers are disabled.

The graph is traced with torch's TorchScript-based ONNX exporter (``dynamo=False``), each site
replaced by an autograd function whose ``symbolic`` emits the integer nodes.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nn import QuantConv2d, QuantLinear, QuantMatMul
from ..quant import TwinGeluQuantizer, TwinSoftmaxQuantizer, UniformQuantizer, qmax
from ..quant.quantizers import group_view, scale_view
from ..quantized import QuantizedModel

__all__ = ["export_onnx", "ExportReport", "SiteExport", "cpu_has_vnni", "GEMM_MODES", "TWIN_COMBINES"]

GEMM_MODES = ("portable", "vnni", "auto")
TWIN_COMBINES = ("gemm", "int32")
DEFAULT_OPSET = 17
_INT32_LIMIT = 2 ** 31 - 1


def cpu_has_vnni() -> bool:
    """Whether this CPU advertises AVX512-VNNI or AVX-VNNI (Linux ``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


@dataclass
class SiteExport:
    """How one quantization site was written to ONNX."""
    name: str
    kind: str          # linear | conv | matmul
    integer: bool      # its products run as integer matmuls
    lowering: str      # what the graph does, in words
    reason: str = ""   # why it stays float (fallbacks only)


@dataclass
class ExportReport:
    path: str
    int8: bool
    gemm: str
    twin_combine: str
    opset: int
    input_shape: tuple
    sites: list = field(default_factory=list)

    @property
    def fallbacks(self) -> list:
        """Sites that run in float, with the reason."""
        return [s for s in self.sites if not s.integer]

    def summary(self) -> str:
        n_int = sum(s.integer for s in self.sites)
        lines = [f"{self.path}: {'int8' if self.int8 else 'float32'} ONNX (opset {self.opset}, input {self.input_shape}"
                 + (f", gemm={self.gemm}, twin combine={self.twin_combine}" if self.int8 else "") + ")"]
        if self.int8:
            lines.append(f"  {n_int}/{len(self.sites)} quantization sites run as integer matmuls")
            kinds: dict = {}
            for s in self.sites:
                if s.integer:
                    kinds[s.lowering] = kinds.get(s.lowering, 0) + 1
            for how, n in kinds.items():
                lines.append(f"    {n:3d} x {how}")
            for s in self.fallbacks:
                lines.append(f"  float fallback: {s.name} ({s.kind}): {s.reason}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# numbers the graph needs, computed with the same torch arithmetic as fake quantization


def _f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _weight_codes(site) -> torch.Tensor:
    wq: UniformQuantizer = site.w_quant
    w = site.weight.detach().float().cpu()
    xg = group_view(w, wq.axis, wq.groups)
    s = scale_view(wq.scale.detach().float().cpu(), wq.axis, w.dim())
    q = qmax(wq.bits)
    return torch.round(xg / s).clamp_(-q, q - 1).reshape(w.shape)


def _fake_quant_weight(site) -> torch.Tensor:
    wq: UniformQuantizer = site.w_quant
    w = site.weight.detach()
    return wq.fake_quant(w) if wq.enabled else w


def _col_scales(wq: UniformQuantizer, out_features: int) -> np.ndarray:
    s = wq.scale.detach().float().cpu().numpy()
    return np.repeat(s, out_features // wq.groups).astype(np.float32)


def _pow2_exponent(ratio: float) -> Optional[int]:
    """``m`` with ``ratio == 2^m`` exactly, else None."""
    if not ratio > 0 or not math.isfinite(ratio):
        return None
    m, e = math.frexp(ratio)
    return e - 1 if m == 0.5 else None


# --------------------------------------------------------------------------------------------
# graph emission inside torch's (TorchScript) ONNX exporter

_REGISTRY: dict = {}


class _Emitter:
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

    def cast_float(self, x):
        return self.op("Cast", x, to_i=1)  # TensorProto.FLOAT


def _set_type(out, like, shape) -> None:
    sizes = [None] + list(shape[1:])
    out.setType(like.type().with_dtype(torch.float32).with_sizes(sizes))


class _SiteFn1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, key):
        return _REGISTRY[key].torch_forward(x)

    @staticmethod
    def symbolic(g, x, key):
        low = _REGISTRY[key]
        out = low.emit(_Emitter(g), x)
        _set_type(out, x, low.out_shape)
        return out


class _SiteFn2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, key):
        return _REGISTRY[key].torch_forward(a, b)

    @staticmethod
    def symbolic(g, a, b, key):
        low = _REGISTRY[key]
        out = low.emit(_Emitter(g), a, b)
        _set_type(out, a, low.out_shape)
        return out


def _frozen_copy(q: nn.Module) -> nn.Module:
    """A copy of a quantizer whose buffers are plain tensors (no autograd history)."""
    c = copy.copy(q)
    c._buffers = {k: None if v is None else v.detach().clone() for k, v in q._buffers.items()}
    c._parameters = {k: None if v is None else v.detach().clone() for k, v in q._parameters.items()}
    c._modules = {}
    return c


class _Lowering:
    """One site's integer lowering: numbers prepared eagerly, ONNX nodes emitted by the exporter."""

    site_export: SiteExport
    out_shape: tuple = ()

    def __init__(self, site: nn.Module):
        # What the site computes, from private copies: this runs inside a traced
        # autograd.Function, where the model's own parameters and buffers must not appear.
        if isinstance(site, QuantMatMul):
            self._aq, self._bq = _frozen_copy(site.a_quant), _frozen_copy(site.b_quant)
        else:
            self._aq = _frozen_copy(site.a_quant)
            with torch.no_grad():
                self._w = _frozen_copy(site.w_quant).fake_quant(site.weight.detach().clone())
            self._bias = None if site.bias is None else site.bias.detach().clone()

    def torch_forward(self, *args):
        if len(args) == 2:
            out = self._aq.fake_quant(args[0]) @ self._bq.fake_quant(args[1])
        else:
            out = F.linear(self._aq.fake_quant(args[0]), self._w, self._bias)
        self.out_shape = tuple(out.shape)
        return out


def _act_encoding(bits: int, unsigned_narrow_possible: bool = True):
    """Zero point and clip of a uniform symmetric activation stored as uint8 ``code + qmax``."""
    q = qmax(bits)
    clip = None if bits == 8 else (0, 2 * q - 1)
    return np.uint8(q), clip, 2 * q - 1 <= 128


class _LinearLowering(_Lowering):
    def __init__(self, name: str, site: QuantLinear, gemm: str, twin_combine: str):
        super().__init__(site)
        wq, aq = site.w_quant, site.a_quant
        codes = _weight_codes(site)                                  # (N, K)
        self.col_scale = _col_scales(wq, site.out_features)          # Δw per output column
        self.bias = None if site.bias is None else _f32(site.bias.detach().float().cpu().numpy())
        qw = qmax(wq.bits)
        if isinstance(aq, TwinGeluQuantizer):
            self.twin = True
            self.b = codes.t().contiguous().numpy().astype(np.int8)  # twin codes are <= 128: u8 x s8 is exact
            self.b_zp = np.int8(0)
            self.pos_step = float(aq.scale.detach().float().cpu()[0])
            self.neg_step = float(aq.neg_scale.detach().float().cpu())
            self.a_bits = aq.bits
            m = _pow2_exponent(self.pos_step / self.neg_step) if self.pos_step != 0 else None
            K = site.in_features
            qa = qmax(aq.bits)
            fits = m is not None and K * qw * ((qa - 1) * 2 ** abs(m) + qa) <= _INT32_LIMIT
            if twin_combine == "int32" and not fits:
                why = "Δ+/Δ- is not a power of two" if m is None else "the shifted int32 sum could overflow"
                raise ValueError(f"{name}: twin_combine='int32' is impossible here ({why}); use 'gemm'")
            self.shift = m if twin_combine == "int32" else None
            self.pow2 = m
            if self.shift is not None:
                how = "GELU twin: 2 MatMulInteger u8 x s8, int32 shift-add"
            elif m is not None:
                how = "GELU twin: 2 MatMulIntegerToFloat u8 x s8, output scales 2^m apart"
            else:
                how = "GELU twin: 2 MatMulIntegerToFloat u8 x s8, free Δ+ (not 2^m Δ-)"
        else:
            self.twin = False
            self.a_scale = float(aq.scale.detach().float().cpu()[0])
            self.a_zp, self.a_clip, narrow = _act_encoding(aq.bits)
            if narrow or gemm == "vnni":
                self.b = codes.t().contiguous().numpy().astype(np.int8)
                self.b_zp = np.int8(0)
                how = "MatMulIntegerToFloat u8 x s8"
            else:
                self.b = (codes.t().contiguous().numpy().astype(np.int16) + qw).astype(np.uint8)
                self.b_zp = np.uint8(qw)
                how = "MatMulIntegerToFloat u8 x u8"
        self.site_export = SiteExport(name, "linear", True, how)

    def uses_contrib_ops(self) -> bool:
        return not (self.twin and self.shift is not None)

    def emit(self, e: _Emitter, x):
        if not self.twin:
            xq = e.quantize(x, _f32(self.a_scale), self.a_zp, clip=self.a_clip)
            args = [xq, e.const(self.b), e.const(_f32(self.a_scale)), e.const(self.col_scale),
                    e.const(self.a_zp), e.const(self.b_zp)]
            if self.bias is not None:
                args.append(e.const(self.bias))
            return e.op("com.microsoft::MatMulIntegerToFloat", *args)
        q = qmax(self.a_bits)
        pos = e.quantize(x, _f32(self.pos_step), np.uint8(0), clip=(0, q - 1))      # clamp(round(x/Δ+), 0, q-1)
        negm = e.quantize(x, _f32(-self.neg_step), np.uint8(0))                     # -clamp(round(x/Δ-), -q, 0)
        b = e.const(self.b)
        if self.shift is None:  # the two accumulators meet in the GEMMs' float output stage
            z8, zs = e.const(np.uint8(0)), e.const(self.b_zp)
            args = [pos, b, e.const(_f32(self.pos_step)), e.const(self.col_scale), z8, zs]
            if self.bias is not None:
                args.append(e.const(self.bias))
            yp = e.op("com.microsoft::MatMulIntegerToFloat", *args)
            yn = e.op("com.microsoft::MatMulIntegerToFloat", negm, b, e.const(_f32(-self.neg_step)),
                      e.const(self.col_scale), z8, zs)
            return e.op("Add", yp, yn)
        acc_p = e.op("MatMulInteger", pos, b)
        acc_n = e.op("MatMulInteger", negm, b)
        m = self.shift
        if m >= 0:
            acc = e.op("Sub", e.op("Mul", acc_p, e.const(np.int32(2 ** m))) if m else acc_p, acc_n)
            unit = self.neg_step
        else:
            acc = e.op("Sub", acc_p, e.op("Mul", acc_n, e.const(np.int32(2 ** -m))))
            unit = self.pos_step
        y = e.op("Mul", e.cast_float(acc), e.const(_f32(self.col_scale * np.float32(unit))))
        if self.bias is not None:
            y = e.op("Add", y, e.const(self.bias))
        return y


class _MatMulLowering(_Lowering):
    def __init__(self, name: str, site: QuantMatMul, gemm: str, twin_combine: str, k_dim: int,
                 out_rank: int):
        super().__init__(site)
        aq, bq = site.a_quant, site.b_quant
        if not isinstance(bq, UniformQuantizer):
            raise NotImplementedError(f"operand B quantizer {type(bq).__name__}")
        self.out_rank = out_rank
        heads = bq.groups
        self.b_axis = bq.axis if bq.groups > 1 else None
        self.b_scale = _f32(bq.scale.detach().float().cpu().numpy())
        qb = qmax(bq.bits)
        self.twin = isinstance(aq, TwinSoftmaxQuantizer)
        if self.twin:
            bits = aq.bits
            levels = qmax(bits) - 1
            split = aq.split.detach().float().cpu()
            self.split = float(split)
            self.form = aq.form
            self.step_lo = float(split / levels)              # Δ_R1, as torch computes it
            self.step_hi = float(torch.ones(()) / levels)     # Δ_R2
            self.lo_max = int(torch.round(split / (split / levels)).clamp(0, levels))         # sum form: lo at x >= s
            self.hi_min = int(torch.round(torch.clamp(split, split, torch.ones(())) * levels))  # sum form: hi at x <= s
            i = _pow2_exponent(self.step_hi / self.step_lo)
            if i is None or i < 0:  # Δ_R2 / Δ_R1 = 1/s = 2^i by construction
                raise NotImplementedError(f"softmax twin with a split that is not a power of two ({self.split})")
            narrow = True
            if twin_combine == "int32" and k_dim * levels * qb * (2 ** i + 1) > _INT32_LIMIT:
                raise ValueError(f"{name}: twin_combine='int32' could overflow int32 (split 2^-{i}, {k_dim} tokens)")
            self.shift = i
            self.int32 = twin_combine == "int32"
            # below 2^24 each accumulator is exact in float32; scaling the hi one by 2^i is exact too,
            # so the one rounding of the float add equals the one rounding of casting the int32
            # shift-add: both combines give bit-identical results
            self.exact_float = k_dim * levels * qb < 2 ** 24
            how = f"softmax twin ({self.form}): 2 " + (
                "MatMulInteger u8 x s8, int32 shift-add" if self.int32 else
                "MatMulIntegerToFloat u8 x s8, hi output scaled by 2^i"
                + ("" if self.exact_float else " (accumulators may pass 2^24: float add rounds)"))
        else:
            if not isinstance(aq, UniformQuantizer):
                raise NotImplementedError(f"operand A quantizer {type(aq).__name__}")
            self.a_axis = aq.axis if aq.groups > 1 else None
            self.a_scale = _f32(aq.scale.detach().float().cpu().numpy())
            self.a_zp, self.a_clip, narrow = _act_encoding(aq.bits)
            if aq.groups > 1:
                self.a_zp = np.full(aq.groups, self.a_zp, np.uint8)
            how = "MatMulIntegerToFloat u8 x {} per head"
        if narrow or gemm == "vnni":
            self.b_zp, self.b_clip, b_type = np.int8(0), (None if bq.bits == 8 else (-qb, qb - 1)), "s8"
        else:
            self.b_zp, self.b_clip, _ = _act_encoding(bq.bits)
            b_type = "u8"
        if self.b_axis is not None:
            self.b_zp = np.full(heads, self.b_zp, self.b_zp.dtype)
        if not self.twin:
            how = how.format(b_type)
        self.site_export = SiteExport(name, "matmul", True, how)

    def uses_contrib_ops(self) -> bool:
        return not (self.twin and self.int32)

    def _head_shape(self, v: np.ndarray) -> np.ndarray:
        v = _f32(v)
        if v.size == 1:
            return v.reshape(())
        shape = [1] * self.out_rank
        shape[self.b_axis] = v.size
        return v.reshape(shape)

    def emit(self, e: _Emitter, a, b):
        bq = e.quantize(b, self.b_scale if self.b_axis is not None else self.b_scale.reshape(()), self.b_zp,
                        axis=self.b_axis, clip=self.b_clip)
        b_zp = e.const(self.b_zp if self.b_zp.ndim == 0 else self.b_zp[:1].reshape(()))
        if self.b_zp.ndim and np.any(self.b_zp != self.b_zp.flat[0]):
            raise AssertionError("per-head zero points must be equal")
        if not self.twin:
            aq = e.quantize(a, self.a_scale if self.a_axis is not None else self.a_scale.reshape(()), self.a_zp,
                            axis=self.a_axis, clip=self.a_clip)
            a_zp = e.const(self.a_zp if self.a_zp.ndim == 0 else self.a_zp[:1].reshape(()))
            one = e.const(_f32(1.0))
            acc = e.op("com.microsoft::MatMulIntegerToFloat", aq, bq, one, one, a_zp, b_zp)
            return e.op("Mul", acc, e.const(self._head_shape(self.a_scale * self.b_scale)))
        u8 = np.uint8
        lo_all = e.quantize(a, _f32(self.step_lo), u8(0))
        hi_all = e.quantize(a, _f32(self.step_hi), u8(0))
        if self.form == "select":
            # codes of the region each value falls in; masks by multiplication (ORT's Where is slow)
            below = e.op("Cast", e.op("Less", a, e.const(_f32(self.split))), to_i=2)  # TensorProto.UINT8
            above = e.op("Sub", e.const(u8(1)), below)
            lo = e.op("Mul", lo_all, below)
            hi = e.op("Mul", hi_all, above)
        else:  # "sum": lo = clamp(round(clamp(x,0,s)/Δ_R1)), hi = round(clamp(x,s,1)/Δ_R2); round is monotone
            lo = e.op("Min", lo_all, e.const(u8(self.lo_max)))
            hi = e.op("Max", hi_all, e.const(u8(self.hi_min)))
        z8 = e.const(u8(0))
        unit = e.const(self._head_shape(self.b_scale * np.float32(self.step_lo)))
        if self.int32:
            acc_lo = e.op("MatMulInteger", lo, bq, z8, b_zp)
            acc_hi = e.op("MatMulInteger", hi, bq, z8, b_zp)
            hi_s = e.op("Mul", acc_hi, e.const(np.int32(2 ** self.shift))) if self.shift else acc_hi
            return e.op("Mul", e.cast_float(e.op("Add", acc_lo, hi_s)), unit)
        one = e.const(_f32(1.0))
        y_lo = e.op("com.microsoft::MatMulIntegerToFloat", lo, bq, one, one, z8, b_zp)
        y_hi = e.op("com.microsoft::MatMulIntegerToFloat", hi, bq, e.const(_f32(2.0 ** self.shift)), one, z8, b_zp)
        return e.op("Mul", e.op("Add", y_lo, y_hi), unit)


# --------------------------------------------------------------------------------------------
# patching the model for export


def _enabled(q) -> bool:
    return q is not None and q.enabled


def _plan(qmodel: QuantizedModel, example: torch.Tensor, gemm: str, twin_combine: str):
    """Decide every site's lowering; return (patches, site exports)."""
    sites = qmodel.sites()
    # one eager pass records the shapes the matmul lowerings need (tokens = K of softmax @ v)
    shapes: dict = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: shapes.__setitem__(n, ([tuple(t.shape) for t in inp], tuple(out.shape))))
             for n, m in sites.items()]
    try:
        with torch.no_grad():
            qmodel(example)
    finally:
        for h in hooks:
            h.remove()

    patches, exports = [], []
    for name, site in sites.items():
        if isinstance(site, QuantConv2d):
            w = _fake_quant_weight(site).clone()
            exports.append(SiteExport(name, "conv", False, "float Conv2d, weight dequantized from its int8 codes",
                                      "its input is the float image (not quantized by the method, docs/method.md §1)"))

            def conv_fwd(x, s=site, w=w):
                return F.conv2d(x, w, s.bias, s.stride, s.padding, s.dilation, s.conv_groups)
            patches.append((site, conv_fwd))
            continue
        if isinstance(site, QuantLinear):
            if not (_enabled(site.w_quant) and _enabled(site.a_quant)):
                exports.append(SiteExport(name, "linear", False, "float MatMul", "a quantizer of this site is disabled"))
                continue
            low = _LinearLowering(name, site, gemm, twin_combine)
        elif isinstance(site, QuantMatMul):
            if not (_enabled(site.a_quant) and _enabled(site.b_quant)):
                exports.append(SiteExport(name, "matmul", False, "float MatMul", "a quantizer of this site is disabled"))
                continue
            in_shapes, out_shape = shapes[name]
            try:
                low = _MatMulLowering(name, site, gemm, twin_combine, in_shapes[0][-1], len(out_shape))
            except NotImplementedError as err:
                exports.append(SiteExport(name, "matmul", False, "float MatMul", f"no integer lowering for {err}"))
                continue
        else:
            exports.append(SiteExport(name, type(site).__name__, False, "float", "unknown site type"))
            continue
        key = len(_REGISTRY)
        _REGISTRY[key] = low
        exports.append(low.site_export)
        if isinstance(site, QuantMatMul):
            patches.append((site, lambda a, b, k=key: _SiteFn2.apply(a, b, k)))
        else:
            patches.append((site, lambda x, k=key: _SiteFn1.apply(x, k)))
    return patches, exports


@contextlib.contextmanager
def _patched(patches):
    try:
        for mod, fwd in patches:
            mod.forward = fwd
        yield
    finally:
        for mod, _ in patches:
            if "forward" in mod.__dict__:
                del mod.forward


def _example_input(model: nn.Module, batch_size: int, input_size: Optional[tuple]) -> torch.Tensor:
    if input_size is None:
        pe = getattr(model, "patch_embed", None)
        img = getattr(pe, "img_size", None)
        if img is None:
            raise ValueError("cannot tell the model's input size; pass input_size=(3, H, W)")
        chans = pe.proj.in_channels
        input_size = (chans, *img)
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, *input_size, generator=gen)


def _torch_export(module: nn.Module, example: torch.Tensor, path: str, opset: int, dynamic_batch: bool,
                  contrib_ops: bool = False) -> None:
    kwargs = dict(dynamo=False, opset_version=opset, input_names=["input"], output_names=["logits"],
                  do_constant_folding=True)
    if contrib_ops:
        kwargs["custom_opsets"] = {"com.microsoft": 1}
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "logits": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings and the exporter's deprecation notice
        with torch.no_grad():
            torch.onnx.export(module, (example,), path, **kwargs)


def _postprocess(path: str, meta: dict) -> None:
    import onnx

    model = onnx.load(path)
    _fold_constant_muls(model.graph)
    _quantize_before_transpose(model.graph)
    _drop_unused(model.graph)
    del model.metadata_props[:]
    for k, v in meta.items():
        p = model.metadata_props.add()
        p.key, p.value = k, str(v)
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _quantize_before_transpose(graph) -> None:
    """``QuantizeLinear(Transpose(x))`` -> ``Transpose(QuantizeLinear(x))`` where the quantization
    axis is not moved (kᵀ of q@kᵀ): the transpose then moves bytes instead of floats, and ORT's
    QDQ propagation no longer wraps it in an extra DequantizeLinear/QuantizeLinear pair."""
    from onnx import helper

    consumers: dict = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producer = {o: n for n in graph.node for o in n.output}
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        t = producer.get(q.input[0])
        if t is None or t.op_type != "Transpose" or len(consumers.get(t.output[0], [])) != 1:
            continue
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        axis = next((a.i for a in q.attribute if a.name == "axis"), 1)
        if perm is None or perm[axis] != axis:
            continue
        mid = q.output[0] + "_before_transpose"
        new_q = helper.make_node("QuantizeLinear", [t.input[0], *q.input[1:]], [mid], name=q.name,
                                 **({"axis": axis} if any(a.name == "axis" for a in q.attribute) else {}))
        new_t = helper.make_node("Transpose", [mid], [q.output[0]], name=t.name, perm=perm)
        idx = list(graph.node).index(q)
        graph.node.remove(t)
        graph.node.remove(q)
        idx = min(idx, len(graph.node))
        graph.node.insert(idx - 1 if idx else 0, new_q)
        graph.node.insert(idx if idx else 1, new_t)


def _drop_unused(graph) -> None:
    """Remove Constant nodes and initializers nothing reads (left behind by the rewrites)."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for n in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(n)
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def _fold_constant_muls(graph) -> None:
    """``Mul(Mul(x, c1), c2) -> Mul(x, c1·c2)`` for scalar/broadcast constants (q@kᵀ's per-head
    scale times the attention ``* scale``): one elementwise pass less per attention block."""
    from onnx import numpy_helper

    consts = {}
    for n in graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            consts[n.output[0]] = n
    for init in graph.initializer:
        consts.setdefault(init.name, init)

    def value(name):
        c = consts.get(name)
        if c is None:
            return None
        return numpy_helper.to_array(c.attribute[0].t if hasattr(c, "attribute") and c.attribute else c)

    consumers: dict = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producer = {o: n for n in graph.node for o in n.output}
    graph_outputs = {o.name for o in graph.output}
    removed = []
    for n in list(graph.node):
        if n.op_type != "Mul":
            continue
        c2 = value(n.input[1])
        first = producer.get(n.input[0])
        if c2 is None or first is None or first.op_type != "Mul" or n.input[0] in graph_outputs:
            continue
        if len(consumers.get(first.output[0], [])) != 1:
            continue
        c1 = value(first.input[1])
        if c1 is None or c1.dtype != np.float32 or c2.dtype != np.float32 or c2.size != 1:
            continue
        folded = (c1 * c2.reshape(())).astype(np.float32)
        name = first.output[0] + "_folded_scale"
        graph.initializer.append(numpy_helper.from_array(folded, name))
        n.input[0] = first.input[0]
        n.input[1] = name
        removed.append(first)
    for r in removed:
        graph.node.remove(r)


def export_onnx(model: Union[QuantizedModel, nn.Module], path: Union[str, os.PathLike], *, int8: bool = True,
                batch_size: Optional[int] = None, input_size: Optional[tuple] = None, gemm: str = "portable",
                twin_combine: str = "gemm", opset: int = DEFAULT_OPSET) -> ExportReport:
    """Write ``model`` as ONNX; return what was done (:class:`ExportReport`).

    Args:
        model: a :class:`QuantizedModel` (``int8=True``: integer graph; ``int8=False``: its float
            model, quantizers off) or a float ``nn.Module`` (``int8=False`` only).
        batch_size: fixed batch size, or None for a dynamic batch dimension.
        input_size: ``(C, H, W)``; default: the model's patch embedding size.
        gemm: ``"portable"`` | ``"vnni"`` | ``"auto"`` (see the module docstring).
        twin_combine: how the two integer products of a twin quantizer are combined.
            ``"gemm"`` (default): two ``MatMulIntegerToFloat`` whose output scales carry the two
            steps (for the softmax twin they are exactly ``2^i`` apart: the shift happens in the
            float exponent, bit-identical to an int32 shift-add while accumulators stay below
            2^24); ``"int32"``: two ``MatMulInteger``, an int32 multiply by ``2^i`` (``2^m``) and
            add, one cast (needs power-of-two ranges; refused where int32 could overflow).
    """
    if gemm not in GEMM_MODES:
        raise ValueError(f"gemm must be one of {GEMM_MODES}, got {gemm!r}")
    if twin_combine not in TWIN_COMBINES:
        raise ValueError(f"twin_combine must be one of {TWIN_COMBINES}, got {twin_combine!r}")
    path = os.fspath(path)
    if gemm == "auto":
        gemm = "vnni" if cpu_has_vnni() else "portable"
    inner = model.model if isinstance(model, QuantizedModel) else model
    was_training = inner.training
    inner.eval()
    example = _example_input(inner, batch_size or 2, input_size)
    report = ExportReport(path, int8, gemm if int8 else "", twin_combine if int8 else "", opset,
                          (batch_size or "batch",) + tuple(example.shape[1:]))
    meta = {"producer": "ptq4vit", "ptq4vit.int8": int(int8)}
    try:
        if not int8:
            if isinstance(model, QuantizedModel):
                meta.update({"ptq4vit.model": model.name})
                with model.quantization_disabled():
                    _torch_export(model, example, path, opset, batch_size is None)
            else:
                _torch_export(model, example, path, opset, batch_size is None)
            _postprocess(path, meta)
            return report
        if not isinstance(model, QuantizedModel):
            raise TypeError("int8 export needs a QuantizedModel (from ptq4vit.quantize or ptq4vit.load)")
        from .. import __version__
        _REGISTRY.clear()
        patches, exports = _plan(model, example, gemm, twin_combine)
        report.sites = exports
        contrib = any(low.uses_contrib_ops() for low in _REGISTRY.values())
        with _patched(patches):
            _torch_export(model, example, path, opset, batch_size is None, contrib_ops=contrib)
        meta.update({"ptq4vit.version": __version__, "ptq4vit.model": model.name, "ptq4vit.preset": model.preset.name,
                     "ptq4vit.w_bits": model.w_bits, "ptq4vit.a_bits": model.a_bits, "ptq4vit.gemm": gemm,
                     "ptq4vit.twin_combine": twin_combine,
                     "ptq4vit.float_fallbacks": "; ".join(f"{s.name}: {s.reason}" for s in report.fallbacks) or "none"})
        _postprocess(path, meta)
        return report
    finally:
        _REGISTRY.clear()
        inner.train(was_training)

"""Site lowerings as standard ONNX ``QuantizeLinear``/``DequantizeLinear`` (QDQ) around float ops.

Runtimes (ONNX Runtime, OpenVINO, TensorRT) recognise ``DequantizeLinear → MatMul`` and run it as
an integer GEMM; nothing here needs a runtime's private operators. Each product keeps the
integers of the contrib lowering (:mod:`.contrib`), so both graphs compute the same thing:

* linear: ``Q(x, Δx, z) → DQ(Δx, z)`` (int8, zero point 0, or the asymmetric quantizer's integer
  ``z``: then the codes are torch's ``clamp(round(x/Δ) + z)`` as they are) times ``DQ(W codes, Δw per column, axis=1)``
  (int8 initializer), then the bias. Below 8 bits a float ``Clip`` to the code range comes
  first (``round(clip(x)/Δ)`` equals ``clamp(round(x/Δ))``).
* per-head operands (``q @ kᵀ``, ``softmax @ v``): the right operand's ``Q`` has the head axis as
  its quantization axis (per-head scales), its ``DQ`` a scale of 1; the left operand is divided
  by its per-head Δ and goes through a per-tensor ``Q → DQ`` pair of scale 1 (runtimes fuse only
  per-tensor left operands; the division is the one ``QuantizeLinear`` does, so the codes are
  the same). ``DQ → MatMul`` is then one integer GEMM over all heads, and the per-head ``Δa·Δb``
  multiplies the product.
* ``softmax @ v`` twin (``select``): ``lo = Q(x·[x<s], Δ_R1)`` and ``hi = Q(x - x·[x<s], Δ_R2)``
  (uint8, zero point 0; the masked value is 0 and so is its code), two GEMMs with the codes of v,
  the ``hi`` one dequantized with scale ``2^i``: ``(lo@v + 2^i·hi@v)·Δ_R1·Δv``. ``sum``
  (``official``): ``lo = Q(clip(x, 0, s), Δ_R1)``, ``hi = Q(clip(x, s, 1)·(qmax-1), 1)``, the
  released code's rounding.
* ``fc2`` post-GELU twin: ``pos = Q(clip(x, 0, (q-1)Δ+), Δ+)`` (uint8) and
  ``neg = Q(clip(x, -qΔ-, 0), Δ-)`` (int8), two GEMMs on the same weight codes, added in float.

The twins' unsigned codes are at most 128, so their u8×s8 products are exact on every x86 CPU;
full-range 8-bit activations times int8 weights need VNNI for exactness in ONNX Runtime (see
:func:`ptq4vit.export.ort.make_session`, which rewrites them to u8×u8 on other CPUs at load time).
"""
from __future__ import annotations

import numpy as np

from ..nn import QuantLinear, QuantMatMul
from ..quant import qmax
from .contrib import head_shape
from .lowering import Emitter, Lowering, f32, integer_linear, integer_matmul, weight_codes
from .report import SiteExport

__all__ = ["QdqLinear", "QdqMatMul"]

_I8, _U8 = np.int8, np.uint8


def _clip(e: Emitter, x, low, high):
    return e.op("Clip", x, e.const(f32(low)), e.const(f32(high)))


def _qdq(e: Emitter, x, scale: float, zp, dq_scale: float = None):
    """``DQ(Q(x, scale, zp), dq_scale or scale, zp)``: per-tensor codes, as the product's left operand."""
    q = e.quantize(x, f32(scale), zp)
    return e.dequantize(q, f32(scale if dq_scale is None else dq_scale), zp)


class QdqLinear(Lowering):
    def __init__(self, name: str, site: QuantLinear):
        self.col_scale, inp = integer_linear(site)
        super().__init__(site)
        self.w = weight_codes(site).t().contiguous().numpy().astype(_I8)   # (K, N): MatMul's right operand
        self.bias = None if site.bias is None else f32(site.bias.detach().float().cpu().numpy())
        self.gelu = inp if inp.integer_form == "gelu_twin" else None
        if self.gelu is None:
            self.inp = inp
            how = ("QDQ MatMul, int8 activation x int8 weight" if self.inp.zero_point == 0 else
                   "QDQ MatMul, int8 activation with zero point x int8 weight")
        else:
            how = "GELU twin: 2 QDQ MatMuls (pos uint8, neg int8) x int8 weight, added in float"
        self.site_export = SiteExport(name, "linear", True, how)

    def _weight(self, e: Emitter):
        return e.dequantize(e.const(self.w), self.col_scale, np.zeros(len(self.col_scale), _I8), axis=1)

    def emit(self, e: Emitter, x):
        x = self.smoothed_input(e, x)
        flat = len(self.out_shape) == 2
        if flat:  # (B, C), the head: ORT would fuse a 2-D MatMul + Add into a float Gemm before its QDQ fusion
            x = e.op("Unsqueeze", x, e.const(np.array([1], np.int64)))
        if self.gelu is None:
            inp = self.inp
            if inp.bits < 8:  # int8 saturation does the clamp at 8 bits
                x = _clip(e, x, *inp.code_range)
            xq = _qdq(e, x, inp.scale, _I8(inp.zero_point))
            y = e.op("MatMul", xq, self._weight(e))
        else:
            t = self.gelu
            q = qmax(t.bits)
            pos = _qdq(e, _clip(e, x, 0.0, (q - 1) * np.float32(t.pos_step)), t.pos_step, _U8(0))
            neg = _qdq(e, _clip(e, x, -q * np.float32(t.neg_step), 0.0), t.neg_step, _I8(0))
            y = e.op("Add", e.op("MatMul", pos, self._weight(e)), e.op("MatMul", neg, self._weight(e)))
        if self.bias is not None:
            y = e.op("Add", y, e.const(self.bias))
        return e.op("Squeeze", y, e.const(np.array([1], np.int64))) if flat else y


class QdqMatMul(Lowering):
    def __init__(self, name: str, site: QuantMatMul, out_rank: int):
        super().__init__(site)
        a, b = integer_matmul(site)
        self.out_rank = out_rank
        self.b_bits, self.b_axis, self.b_scale = b.bits, b.axis, b.scale
        if a.integer_form == "softmax_twin":
            self.softmax = a
            how = f"softmax twin ({self.softmax.form}): 2 QDQ MatMuls uint8 x int8 per head, hi dequantized by 2^i"
        else:
            self.softmax = None
            self.a_bits, self.a_axis, self.a_scale = a.bits, a.axis, a.scale
            how = "QDQ MatMul uint8 x int8 per head"
        self.site_export = SiteExport(name, "matmul", True, how)

    def _head(self, e: Emitter, v: np.ndarray):
        return e.const(head_shape(v, self.out_rank, self.b_axis if self.b_axis is not None else 1))

    def _b_codes(self, e: Emitter, b):
        """``DQ(Q(b, Δb per head), 1)``: v's or kᵀ's codes as the product's right operand."""
        q = qmax(self.b_bits)
        if self.b_bits < 8:
            lim = head_shape(self.b_scale, self.out_rank, self.b_axis if self.b_axis is not None else 1)
            b = e.op("Min", e.op("Max", b, e.const(-q * lim)), e.const((q - 1) * lim))
        if self.b_axis is None:
            codes = e.quantize(b, self.b_scale.reshape(()), _I8(0))
        else:
            codes = e.quantize(b, self.b_scale, np.zeros(self.b_scale.size, _I8), axis=self.b_axis)
        return e.dequantize(codes, f32(1.0), _I8(0))

    def _a_codes(self, e: Emitter, a):
        """``DQ(Q(a / Δa, 1), 1)``: the left operand's codes under a per-tensor QDQ pair, which both
        ONNX Runtime and OpenVINO fuse (neither fuses a per-head left operand). The division is
        the one QuantizeLinear would do, so the codes are the same. Below 8 bits ``a`` is clamped
        to the per-head code range before the division (a clamp of ``a / Δa`` between the
        division and the Q gives OpenVINO other codes than ONNX Runtime: 0.24 relative at 4 bits);
        ``round(clamp(a, -qΔ, (q-1)Δ) / Δ)`` equals ``clamp(round(a / Δ), -q, q-1)``."""
        step = head_shape(self.a_scale, self.out_rank, self.b_axis if self.b_axis is not None else 1)
        if self.a_bits < 8:
            q = qmax(self.a_bits)
            a = e.op("Min", e.op("Max", a, e.const(-q * step)), e.const((q - 1) * step))
        return _qdq(e, e.op("Div", a, e.const(step)), 1.0, _I8(0))

    def emit(self, e: Emitter, a, b):
        if self.softmax is None:
            y = e.op("MatMul", self._a_codes(e, a), self._b_codes(e, b))
            return e.op("Mul", y, self._head(e, self.a_scale * self.b_scale))
        t = self.softmax
        if t.form == "select":
            below = e.op("Cast", e.op("Less", a, e.const(f32(t.threshold))), to_i=1)  # TensorProto.FLOAT
            lo_in = e.op("Mul", a, below)
            hi_in = e.op("Sub", a, lo_in)
            if t.clip_hi:  # above the top: the largest code
                hi_in = e.op("Min", hi_in, e.const(f32(t.step_hi * t.levels)))
        else:
            lo_in = _clip(e, a, 0.0, t.split)
            hi_in = _clip(e, a, t.split, 1.0)
        lo = _qdq(e, lo_in, t.step_lo, _U8(0), dq_scale=1.0)
        if t.form == "select":
            hi = _qdq(e, hi_in, t.step_hi, _U8(0), dq_scale=float(2 ** t.shift))
        else:  # the released code's round(x·(qmax-1))
            hi = _qdq(e, e.op("Mul", hi_in, e.const(f32(t.levels))), 1.0, _U8(0), dq_scale=float(2 ** t.shift))
        y = e.op("Add", e.op("MatMul", lo, self._b_codes(e, b)), e.op("MatMul", hi, self._b_codes(e, b)))
        return e.op("Mul", y, self._head(e, self.b_scale * np.float32(t.step_lo)))

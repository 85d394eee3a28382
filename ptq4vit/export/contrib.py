"""Site lowerings onto ONNX Runtime's contrib integer GEMMs (``com.microsoft.MatMulIntegerToFloat``).

Every quantized operand becomes an 8-bit integer tensor (``QuantizeLinear``: round half to even
of ``x / Δ``, exactly torch's rounding) and every quantized product an integer matmul whose int32
accumulators are scaled back to float in the GEMM's output stage:

* linear layers: ``QuantizeLinear`` of the input, ``MatMulIntegerToFloat`` on the weight codes
  with output scale ``Δx·Δw`` (per q/k/v block or channel) and the bias;
* ``q @ kᵀ``: both operands quantized per head, one integer matmul, one float multiply by
  ``Δq·Δk·attn_scale`` per head;
* ``softmax @ v`` with the twin quantizer: two uint8 code tensors ``lo`` and ``hi``, two integer
  matmuls with the codes of v, ``lo@v + 2^i·(hi@v)``, times ``Δ_R1·Δv`` per head. The ``2^i`` is
  the hi GEMM's output scale (an exponent shift: while the accumulators stay below 2^24 this is
  bit-identical to an int32 shift-add and one cast), or, with ``twin_combine="int32"``, an int32
  multiply-add before one cast. The released code's ``hi + lo`` ("sum") form has the same
  integer structure with clamped codes.
* ``fc2`` with the post-GELU twin: ``pos`` and ``neg`` codes, two integer matmuls on the same
  weight codes with output scales ``Δ+·Δw`` and ``Δ-·Δw`` (``2^m`` apart with a power-of-two Δ+;
  ``int32`` combine then shifts in int32). A free Δ+ meets in float.

``gemm`` picks the integer operand types (exactness on CPUs without VNNI, docs/deployment.md):
``"portable"`` uses u8×s8 only where the unsigned codes are at most 128 and u8×u8 elsewhere;
``"vnni"`` uses u8×s8 everywhere.
"""
from __future__ import annotations

import numpy as np

from ..errors import UserError
from ..nn import QuantLinear, QuantMatMul
from ..quant import qmax
from .lowering import INT32_LIMIT, Emitter, Lowering, act_encoding, f32, integer_linear, integer_matmul, weight_codes
from .report import SiteExport

__all__ = ["ContribLinear", "ContribMatMul"]

_MMITF = "com.microsoft::MatMulIntegerToFloat"


class ContribLinear(Lowering):
    def __init__(self, name: str, site: QuantLinear, gemm: str, twin_combine: str):
        self.col_scale, inp = integer_linear(site)                   # Δw per output column, the input's form
        super().__init__(site)
        codes = weight_codes(site)                                   # (N, K)
        self.bias = None if site.bias is None else f32(site.bias.detach().float().cpu().numpy())
        qw = qmax(site.w_quant.bits)
        self.twin = inp.integer_form == "gelu_twin"
        if self.twin:
            t = self.gelu = inp
            self.b = codes.t().contiguous().numpy().astype(np.int8)  # twin codes are <= 128: u8 x s8 is exact
            self.b_zp = np.int8(0)
            qa = qmax(t.bits)
            m = t.pow2
            fits = m is not None and site.in_features * qw * ((qa - 1) * 2 ** abs(m) + qa) <= INT32_LIMIT
            if twin_combine == "int32" and not fits:
                why = "Δ+/Δ- is not a power of two" if m is None else "the shifted int32 sum could overflow"
                raise UserError(f"{name}: twin_combine='int32' is impossible here ({why}); use 'gemm'")
            self.shift = m if twin_combine == "int32" else None
            if self.shift is not None:
                how = "GELU twin: 2 MatMulInteger u8 x s8, int32 shift-add"
            elif m is not None:
                how = "GELU twin: 2 MatMulIntegerToFloat u8 x s8, output scales 2^m apart"
            else:
                how = "GELU twin: 2 MatMulIntegerToFloat u8 x s8, free Δ+ (not 2^m Δ-)"
        else:
            self.a_scale = inp.scale
            self.a_zp, self.a_clip, narrow = act_encoding(inp.bits, inp.zero_point)
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

    def emit(self, e: Emitter, x):
        x = self.smoothed_input(e, x)
        if not self.twin:
            xq = e.quantize(x, f32(self.a_scale), self.a_zp, clip=self.a_clip)
            args = [xq, e.const(self.b), e.const(f32(self.a_scale)), e.const(self.col_scale),
                    e.const(self.a_zp), e.const(self.b_zp)]
            if self.bias is not None:
                args.append(e.const(self.bias))
            return e.op(_MMITF, *args)
        t = self.gelu
        q = qmax(t.bits)
        pos = e.quantize(x, f32(t.pos_step), np.uint8(0), clip=(0, q - 1))      # clamp(round(x/Δ+), 0, q-1)
        negm = e.quantize(x, f32(-t.neg_step), np.uint8(0))                     # -clamp(round(x/Δ-), -q, 0)
        b = e.const(self.b)
        if self.shift is None:  # the two accumulators meet in the GEMMs' float output stage
            z8, zs = e.const(np.uint8(0)), e.const(self.b_zp)
            args = [pos, b, e.const(f32(t.pos_step)), e.const(self.col_scale), z8, zs]
            if self.bias is not None:
                args.append(e.const(self.bias))
            yp = e.op(_MMITF, *args)
            yn = e.op(_MMITF, negm, b, e.const(f32(-t.neg_step)), e.const(self.col_scale), z8, zs)
            return e.op("Add", yp, yn)
        acc_p = e.op("MatMulInteger", pos, b)
        acc_n = e.op("MatMulInteger", negm, b)
        m = self.shift
        if m >= 0:
            acc = e.op("Sub", e.op("Mul", acc_p, e.const(np.int32(2 ** m))) if m else acc_p, acc_n)
            unit = t.neg_step
        else:
            acc = e.op("Sub", acc_p, e.op("Mul", acc_n, e.const(np.int32(2 ** -m))))
            unit = t.pos_step
        y = e.op("Mul", e.cast_float(acc), e.const(f32(self.col_scale * np.float32(unit))))
        if self.bias is not None:
            y = e.op("Add", y, e.const(self.bias))
        return y


def head_shape(v: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """A per-head vector shaped to broadcast along ``axis`` of a rank-``rank`` output (a scalar stays 0-d)."""
    v = f32(v)
    if v.size == 1:
        return v.reshape(())
    shape = [1] * rank
    shape[axis] = v.size
    return v.reshape(shape)


class ContribMatMul(Lowering):
    def __init__(self, name: str, site: QuantMatMul, gemm: str, twin_combine: str, k_dim: int, out_rank: int):
        super().__init__(site)
        a, bq = integer_matmul(site)
        self.out_rank = out_rank
        heads = bq.groups
        self.b_axis = bq.axis
        self.b_scale = bq.scale
        qb = qmax(bq.bits)
        self.twin = a.integer_form == "softmax_twin"
        if self.twin:
            t = self.softmax = a
            narrow = True
            if twin_combine == "int32" and k_dim * t.levels * qb * (2 ** t.shift + 1) > INT32_LIMIT:
                raise UserError(f"{name}: twin_combine='int32' could overflow int32 (split 2^-{t.shift}, {k_dim} tokens)")
            self.int32 = twin_combine == "int32"
            # below 2^24 each accumulator is exact in float32; scaling the hi one by 2^i is exact too,
            # so the one rounding of the float add equals the one rounding of casting the int32
            # shift-add: both combines give bit-identical results
            exact_float = k_dim * t.levels * qb < 2 ** 24
            how = f"softmax twin ({t.form}): 2 " + (
                "MatMulInteger u8 x s8, int32 shift-add" if self.int32 else
                "MatMulIntegerToFloat u8 x s8, hi output scaled by 2^i"
                + ("" if exact_float else " (accumulators may pass 2^24: float add rounds)"))
        else:
            self.a_axis = a.axis
            self.a_scale = a.scale
            self.a_zp, self.a_clip, narrow = act_encoding(a.bits)
            if a.groups > 1:
                self.a_zp = np.full(a.groups, self.a_zp, np.uint8)
            how = "MatMulIntegerToFloat u8 x {} per head"
        if narrow or gemm == "vnni":
            self.b_zp, self.b_clip, b_type = np.int8(0), (None if bq.bits == 8 else (-qb, qb - 1)), "s8"
        else:
            self.b_zp, self.b_clip, _ = act_encoding(bq.bits)
            b_type = "u8"
        if self.b_axis is not None:
            self.b_zp = np.full(heads, self.b_zp, self.b_zp.dtype)
        if not self.twin:
            how = how.format(b_type)
        self.site_export = SiteExport(name, "matmul", True, how)

    def uses_contrib_ops(self) -> bool:
        return not (self.twin and self.int32)

    def _head_shape(self, v: np.ndarray) -> np.ndarray:
        return head_shape(v, self.out_rank, self.b_axis if self.b_axis is not None else 1)

    def emit(self, e: Emitter, a, b):
        bq = e.quantize(b, self.b_scale if self.b_axis is not None else self.b_scale.reshape(()), self.b_zp,
                        axis=self.b_axis, clip=self.b_clip)
        b_zp = e.const(self.b_zp if self.b_zp.ndim == 0 else self.b_zp[:1].reshape(()))
        if not self.twin:
            aq = e.quantize(a, self.a_scale if self.a_axis is not None else self.a_scale.reshape(()), self.a_zp,
                            axis=self.a_axis, clip=self.a_clip)
            a_zp = e.const(self.a_zp if self.a_zp.ndim == 0 else self.a_zp[:1].reshape(()))
            one = e.const(f32(1.0))
            acc = e.op(_MMITF, aq, bq, one, one, a_zp, b_zp)
            return e.op("Mul", acc, e.const(self._head_shape(self.a_scale * self.b_scale)))
        t = self.softmax
        u8 = np.uint8
        lo_all = e.quantize(a, f32(t.step_lo), u8(0))
        if t.form == "select":
            hi_all = e.quantize(a, f32(t.step_hi), u8(0))
            if t.clip_hi:  # above the top: the largest code
                hi_all = e.op("Min", hi_all, e.const(u8(t.levels)))
        else:  # the released code's round(x·(qmax-1))
            hi_all = e.quantize(e.op("Mul", a, e.const(f32(t.levels))), f32(1.0), u8(0))
        if t.form == "select":
            # codes of the region each value falls in; masks by multiplication (ORT's Where is slow)
            below = e.op("Cast", e.op("Less", a, e.const(f32(t.threshold))), to_i=2)  # TensorProto.UINT8
            above = e.op("Sub", e.const(u8(1)), below)
            lo = e.op("Mul", lo_all, below)
            hi = e.op("Mul", hi_all, above)
        else:  # "sum": lo = clamp(round(clamp(x,0,s)/Δ_R1)), hi = round(clamp(x,s,1)·(qmax-1)); round is monotone
            lo = e.op("Min", lo_all, e.const(u8(t.lo_max)))
            hi = e.op("Max", hi_all, e.const(u8(t.hi_min)))
        z8 = e.const(u8(0))
        unit = e.const(self._head_shape(self.b_scale * np.float32(t.step_lo)))
        if self.int32:
            acc_lo = e.op("MatMulInteger", lo, bq, z8, b_zp)
            acc_hi = e.op("MatMulInteger", hi, bq, z8, b_zp)
            hi_s = e.op("Mul", acc_hi, e.const(np.int32(2 ** t.shift))) if t.shift else acc_hi
            return e.op("Mul", e.cast_float(e.op("Add", acc_lo, hi_s)), unit)
        one = e.const(f32(1.0))
        y_lo = e.op(_MMITF, lo, bq, one, one, z8, b_zp)
        y_hi = e.op(_MMITF, hi, bq, e.const(f32(2.0 ** t.shift)), one, z8, b_zp)
        return e.op("Mul", e.op("Add", y_lo, y_hi), unit)

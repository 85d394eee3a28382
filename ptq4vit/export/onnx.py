"""ONNX export with integer semantics: the plumbing around the site lowerings.

:func:`export_onnx` writes a :class:`~ptq4vit.quantized.QuantizedModel` as an ONNX graph in
which every quantized product is an integer matmul on the codes the torch model rounds to. What
each site becomes is decided by its lowering, in one of two formats:

* ``format="contrib"`` (:mod:`.contrib`): ONNX Runtime's ``com.microsoft.MatMulIntegerToFloat``;
  exact integer products, the fastest graph on ONNX Runtime, ONNX Runtime only.
* ``format="qdq"`` (:mod:`.qdq`): standard ``QuantizeLinear``/``DequantizeLinear`` around float
  ``MatMul``s, which ONNX Runtime, OpenVINO and TensorRT fuse into integer kernels.

This module decides every site's lowering (one eager pass records the shapes they need), puts
each lowering in place of its module's forward while torch's TorchScript-based exporter
(``dynamo=False``) traces the model, and hands the graph to :mod:`.graph` for the final rewrites.

What stays float is what the method keeps float (LayerNorm, softmax, GELU, residuals, biases,
embeddings) plus the products listed in :attr:`ExportReport.fallbacks`: the patch embedding (its
input is the float image, docs/method.md §1: the weight is dequantized from its int8 codes and
the conv runs in float), any site whose quantizers are disabled, attention matmuls that the preset
keeps float (``quantize_attention=False``) or the export keeps float (``float_attention=True``), and
sites whose quantizer has no integer lowering (asymmetric, log-domain: docs/lowbit.md §4, §6, §8),
traced as their own fake-quantized float ops. Modules a method adds that have no integer lowering
at all (fc2's online input rotation, Swin's rotated patch-embedding norm, docs/lowbit.md §2) are listed in
:attr:`ExportReport.float_transforms`.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic_write import atomic_path
from ..errors import UserError
from ..typecheck import checked
from ..nn import QUANT_MODULES, FloatMatMul, QuantConv2d, QuantLinear, QuantMatMul
from ..quant import KindRegistry
from ..quantized import QuantizedModel
from .contrib import ContribLinear, ContribMatMul
from .cpu import cpu_has_vnni
from .graph import postprocess
from .lowering import traced_forward
from .qdq import QdqLinear, QdqMatMul
from ..transforms.modules import OnlineRotation, RotatedLayerNorm
from .report import AllFloatError, ExportReport, FloatTransform, SiteExport
from .input_size import fixed_position_embedding, resolve_input_size
from .provenance import float_provenance_metadata, provenance_metadata

__all__ = ["export_onnx", "ExportReport", "SiteExport", "AllFloatError", "cpu_has_vnni", "FORMATS", "GEMM_MODES", "TWIN_COMBINES"]

FORMATS = ("contrib", "qdq")
GEMM_MODES = ("portable", "vnni", "auto")
TWIN_COMBINES = ("gemm", "int32")
DEFAULT_OPSET = 17


#: What each module a rotation adds runs in float, in words, by module class (docs/lowbit.md §2).
FLOAT_TRANSFORMS: KindRegistry = KindRegistry("float transform")
FLOAT_TRANSFORMS.register(OnlineRotation, lambda m: f"online rotation ({m.extra_repr()}), float MatMuls")
FLOAT_TRANSFORMS.register(RotatedLayerNorm, lambda m: f"LayerNorm with its affine and the stream rotation folded "
                                                      f"into one {m.dim} x {m.dim} float MatMul")


def _float_transform(m: nn.Module) -> Optional[str]:
    """What a module a rotation added runs in float, in words (None for any other module)."""
    describe = FLOAT_TRANSFORMS.find(m)
    return describe(m) if describe is not None else None


def _enabled(q) -> bool:
    return q is not None and q.enabled


def _record_shapes(qmodel: QuantizedModel, example: torch.Tensor) -> dict:
    """Input and output shapes of every site on ``example`` (tokens = K of softmax @ v, output rank)."""
    shapes: dict = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: shapes.__setitem__(n, ([tuple(t.shape) for t in inp], tuple(out.shape))))
             for n, m in qmodel.sites().items()]
    try:
        with torch.no_grad():
            qmodel(example)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _float_matmul(a, b):
    return a @ b


@dataclass(frozen=True)
class _Options:
    """What the export asks of every site's lowering, and the shapes one eager pass recorded."""
    fmt: str
    gemm: str
    twin_combine: str
    float_attention: bool
    shapes: dict


class Lowered(NamedTuple):
    """A site's lowering decision: its report line, the forward traced in place of its own (None:
    its own forward), and the integer lowering behind that forward (None: it stays float)."""
    export: SiteExport
    forward: Optional[Callable] = None
    lowering: Optional[object] = None


def _integer(low, n_inputs: int) -> Lowered:
    return Lowered(low.site_export, traced_forward(low, n_inputs), low)


#: The lowering of each site class: ``(name, site, options) -> Lowered`` (a new site class registers its own).
SITE_LOWERINGS: KindRegistry = KindRegistry("ONNX lowering of site")


@SITE_LOWERINGS.registering(FloatMatMul)
def _lower_float_matmul(name: str, site: FloatMatMul, opts: _Options) -> Lowered:
    return Lowered(SiteExport(name, "matmul", False, "float MatMul",
                              "kept float by the preset (quantize_attention=False: runtimes fuse float attention)"))


@SITE_LOWERINGS.registering(QuantConv2d)
def _lower_conv(name: str, site: QuantConv2d, opts: _Options) -> Lowered:
    w = (site.w_quant.fake_quant(site.weight.detach()) if _enabled(site.w_quant) else site.weight.detach()).clone()
    aq = site.a_quant if _enabled(site.a_quant) else None
    if aq is None:
        export = SiteExport(name, "conv", False, "float Conv2d, weight dequantized from its int8 codes",
                            "its input is the float image (not quantized by the method, docs/method.md §1)")
    else:  # RepQ-ViT's quantized image (docs/lowbit.md §6): fake-quantized in float ops
        export = SiteExport(name, "conv", False, "float Conv2d on the fake-quantized image, weight "
                            "dequantized from its int8 codes", "no integer lowering for a quantized conv input")

    def conv_fwd(x, s=site, w=w, aq=aq):
        if aq is not None:
            x = aq.fake_quant(x)
        return F.conv2d(x, w, s.bias, s.stride, s.padding, s.dilation, s.conv_groups)
    return Lowered(export, conv_fwd)


@SITE_LOWERINGS.registering(QuantLinear)
def _lower_linear(name: str, site: QuantLinear, opts: _Options) -> Lowered:
    if not (_enabled(site.w_quant) and _enabled(site.a_quant)):
        return Lowered(SiteExport(name, "linear", False, "float MatMul", "a quantizer of this site is disabled"))
    try:
        low = (QdqLinear(name, site) if opts.fmt == "qdq" else
               ContribLinear(name, site, opts.gemm, opts.twin_combine))
    except NotImplementedError as err:  # traced as the site's own fake-quantized float ops
        return Lowered(SiteExport(name, "linear", False, "float MatMul on fake-quantized operands",
                                  f"no integer lowering for {err}"))
    return _integer(low, 1)


@SITE_LOWERINGS.registering(QuantMatMul)
def _lower_matmul(name: str, site: QuantMatMul, opts: _Options) -> Lowered:
    if opts.float_attention:
        return Lowered(SiteExport(name, "matmul", False, "float MatMul",
                                  "kept float by float_attention=True (runtimes fuse float attention)"), _float_matmul)
    if not (_enabled(site.a_quant) and _enabled(site.b_quant)):
        return Lowered(SiteExport(name, "matmul", False, "float MatMul", "a quantizer of this site is disabled"))
    in_shapes, out_shape = opts.shapes[name]
    try:
        low = (QdqMatMul(name, site, len(out_shape)) if opts.fmt == "qdq" else
               ContribMatMul(name, site, opts.gemm, opts.twin_combine, in_shapes[0][-1], len(out_shape)))
    except NotImplementedError as err:
        return Lowered(SiteExport(name, "matmul", False, "float MatMul", f"no integer lowering for {err}"))
    return _integer(low, 2)


def _plan(qmodel: QuantizedModel, example: torch.Tensor, fmt: str, gemm: str, twin_combine: str,
          float_attention: bool = False):
    """Decide every site's lowering (its class's handler in ``SITE_LOWERINGS``); return (patches,
    site exports, lowerings)."""
    opts = _Options(fmt, gemm, twin_combine, float_attention, _record_shapes(qmodel, example))
    patches, exports, lowerings = [], [], []
    for name, site in qmodel.model.named_modules():
        lower = SITE_LOWERINGS.find(site)
        if lower is None:
            if isinstance(site, QUANT_MODULES):  # a site class with no lowering registered
                exports.append(SiteExport(name, type(site).__name__, False, "float", "unknown site type"))
            continue
        done = lower(name, site, opts)
        if done.lowering is not None:
            lowerings.append(done.lowering)
        exports.append(done.export)
        if done.forward is not None:
            patches.append((site, done.forward))
    return patches, exports, lowerings


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


def _example_input(batch_size: int, input_size: tuple) -> torch.Tensor:
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


@checked
def export_onnx(model: Union[QuantizedModel, nn.Module], path: Union[str, os.PathLike], *, int8: bool = True,
                format: str = "contrib", batch_size: Optional[int] = None, input_size: Optional[tuple] = None,
                gemm: str = "portable", twin_combine: str = "gemm", opset: int = DEFAULT_OPSET,
                float_attention: bool = False, allow_float: bool = False) -> ExportReport:
    """Write ``model`` as ONNX; return what was done (:class:`ExportReport`).

    Args:
        model: a :class:`QuantizedModel` (``int8=True``: integer graph; ``int8=False``: its float
            model, quantizers off) or a float ``nn.Module`` (``int8=False`` only).
        format: ``"contrib"`` (ONNX Runtime's integer GEMMs) or ``"qdq"`` (standard
            QuantizeLinear/DequantizeLinear, for any runtime); see the module docstring.
        batch_size: fixed batch size, or None for a dynamic batch dimension.
        input_size: ``(C, H, W)``; default: the model's patch embedding size.
        gemm: contrib only. ``"portable"`` (u8×s8 only where it is exact without VNNI),
            ``"vnni"`` (u8×s8 everywhere) or ``"auto"`` (``vnni`` when the exporting CPU has VNNI).
            A ``vnni`` file stays exact elsewhere: :func:`ptq4vit.export.ort.make_session` rewrites
            it at load time on CPUs without VNNI.
        twin_combine: contrib only. How the two integer products of a twin quantizer meet:
            ``"gemm"`` (default): in the two GEMMs' float output scales (for the softmax twin
            exactly ``2^i`` apart, bit-identical to an int32 shift-add while accumulators stay
            below 2^24); ``"int32"``: two ``MatMulInteger``, an int32 shift and add, one cast
            (needs power-of-two ranges; refused where int32 could overflow).
        float_attention: keep ``q @ kᵀ`` and ``softmax @ v`` float (listed as fallbacks): the graph
            then differs from the fake-quantized model there, and runtimes can fuse the float
            attention into one kernel (OpenVINO's MHA), as NNCF's int8 models leave it.
        allow_float: write an int8 graph in which no quantization site runs in integers (e.g. a
            preset whose quantizers have no integer lowering). Without it such an export raises
            :class:`AllFloatError` before anything is written: the file would be int8 in name only.
    """
    if format not in FORMATS:
        raise UserError(f"format must be one of {FORMATS}, got {format!r}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"batch_size must be a positive int (a fixed batch) or None (dynamic), got {batch_size}")
    if gemm not in GEMM_MODES:
        raise UserError(f"gemm must be one of {GEMM_MODES}, got {gemm!r}")
    if twin_combine not in TWIN_COMBINES:
        raise UserError(f"twin_combine must be one of {TWIN_COMBINES}, got {twin_combine!r}")
    if format == "qdq" and twin_combine != "gemm":
        raise UserError("format='qdq' combines twin products in float (twin_combine='gemm'); "
                        "twin_combine='int32' needs format='contrib'")
    path = os.fspath(path)
    if format == "qdq":
        gemm = "runtime"  # the runtime picks its kernels; nothing in the file depends on the CPU
    elif gemm == "auto":
        gemm = "vnni" if cpu_has_vnni() else "portable"
    inner = model.model if isinstance(model, QuantizedModel) else model
    was_training = inner.training
    inner.eval()
    size = resolve_input_size(inner, input_size)
    example = _example_input(batch_size or 2, size)
    report = ExportReport(path, int8, gemm if int8 else "", twin_combine if int8 else "", opset,
                          (batch_size or "batch",) + tuple(example.shape[1:]), format if int8 else "")
    meta = {"producer": "ptq4vit", "ptq4vit.int8": int(int8)}
    try:
        if not int8:
            if isinstance(model, QuantizedModel):
                meta.update({"ptq4vit.model": model.name, "ptq4vit.preset": model.preset.name,
                             "ptq4vit.w_bits": model.w_bits, "ptq4vit.a_bits": model.a_bits,
                             **provenance_metadata(model, size)})
            else:
                meta.update(float_provenance_metadata(model, size))
            with atomic_path(path, what="ONNX file") as tmp, fixed_position_embedding(inner, size):
                if isinstance(model, QuantizedModel):
                    with model.quantization_disabled():
                        _torch_export(model, example, tmp, opset, batch_size is None)
                else:
                    _torch_export(model, example, tmp, opset, batch_size is None)
                postprocess(tmp, meta)
            return report
        if not isinstance(model, QuantizedModel):
            raise UserError("int8 export needs a QuantizedModel (from ptq4vit.quantize or ptq4vit.load)")
        from .. import __version__
        patches, report.sites, lowerings = _plan(model, example, format, gemm, twin_combine, float_attention)
        if not allow_float and not any(s.integer for s in report.sites):
            raise AllFloatError(f"no quantization site of {model.name} ({model.preset.name} W{model.w_bits}"
                                f"A{model.a_bits}) would run in integers in the {format} graph: all "
                                f"{len(report.sites)} stay float ({report.float_kinds()})")
        report.float_transforms = [FloatTransform(name, what) for name, m in model.model.named_modules()
                                   if (what := _float_transform(m)) is not None]
        contrib = any(low.uses_contrib_ops() for low in lowerings)
        meta.update(provenance_metadata(model, size))
        meta.update({"ptq4vit.version": __version__, "ptq4vit.model": model.name, "ptq4vit.preset": model.preset.name,
                     "ptq4vit.w_bits": model.w_bits, "ptq4vit.a_bits": model.a_bits, "ptq4vit.format": format,
                     "ptq4vit.gemm": gemm, "ptq4vit.twin_combine": twin_combine,
                     "ptq4vit.float_attention": int(float_attention),
                     "ptq4vit.float_fallbacks": "; ".join(f"{s.name}: {s.reason}" for s in report.fallbacks) or "none",
                     "ptq4vit.float_transforms": "; ".join(f"{t.name}: {t.what}" for t in report.float_transforms)
                     or "none"})
        with atomic_path(path, what="ONNX file") as tmp:
            with _patched(patches), fixed_position_embedding(inner, size):
                _torch_export(model, example, tmp, opset, batch_size is None, contrib_ops=contrib)
            postprocess(tmp, meta, quantize_before_layout=format == "qdq")
        return report
    finally:
        inner.train(was_training)

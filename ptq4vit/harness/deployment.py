"""Deploying a quantized checkpoint on a runtime, re-checked: export, compile, score, time.

:func:`deploy` writes the int8 graph the runtime runs (and the float32 graph of the same model),
compiles both on the runtime, runs them over the evaluation images in one pass (with the
fake-quantized torch model beside them), and times both on one batch of those images, interleaved.
Every figure is of the exported file *on that runtime*, not of the torch model it came from.

The float32 graph is exported from the float model the checkpoint was quantized from when it is
given (checked against the float-weights digest the checkpoint records), else from the checkpoint's
own model with its quantizers off: its weights are then the dequantized ones (and, for presets that
rewrite weights, the rewritten ones), as a checkpoint does not hold the original float weights.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from ..checkpoint import float_weights_digest
from ..errors import UserError
from ..export.bench import time_interleaved
from ..export.onnx import export_onnx
from ..export.report import ExportReport
from ..export.runtimes import Runtime, get_runtime
from .data import make_loader
from .fidelity import fidelity, top1_agreement

__all__ = ["Deployment", "deploy", "check_float_model", "format_deployment", "FLOAT", "INT8", "TORCH"]

FLOAT, INT8, TORCH = "float32", "int8", "fake-quant torch"

#: What the float32 graph is when no float model is given.
DEQUANTIZED = "the checkpoint's model with its quantizers off (weights dequantized from their codes)"


def check_float_model(qmodel, float_model, what: str = "the given float model",
                      quantized: str = "the checkpoint") -> None:
    """Refuse (UserError naming both digests) a float model whose weights are not the ones ``qmodel``
    was quantized from."""
    recorded = qmodel.float_weights_sha256
    if recorded is None:
        raise UserError(f"{quantized} does not record the float weights it was quantized from; "
                        f"it cannot be compared with {what}")
    got = float_weights_digest(float_model)
    if got != recorded:
        raise UserError(f"{what} is not the float model {quantized} was quantized from: its float weights "
                        f"sha256 is {got[:16]}..., {quantized} records {recorded[:16]}...")


@dataclass
class Deployment:
    runtime: Runtime
    device: str                     # where the runtime ran, in words
    path: str                       # the int8 file
    float_path: str                 # the float32 file (a temporary one unless asked for)
    report: ExportReport
    integer_kernels: int            # product kernels the runtime runs in integers
    n_images: int = 0
    n_skipped: int = 0
    top1: dict = field(default_factory=dict)          # FLOAT / INT8 / TORCH -> %
    vs_float: dict = field(default_factory=dict)      # INT8 / TORCH -> {"agreement": %, "kl": nats}
    torch_agreement: Optional[float] = None           # % images where the int8 file picks the torch model's class
    timing_batch: int = 0
    median_ms: dict = field(default_factory=dict)     # FLOAT / INT8 -> median ms per batch
    repeats: int = 0
    float_source: str = DEQUANTIZED                   # what the float32 graph was exported from, in words
    original_float: bool = False                      # the float model the checkpoint was quantized from

    @property
    def speedup(self) -> Optional[float]:
        if FLOAT in self.median_ms and INT8 in self.median_ms:
            return self.median_ms[FLOAT] / self.median_ms[INT8]
        return None


def deploy(qmodel, dataset, runtime: str, out: "str | os.PathLike", *, float_out: Optional[str] = None,
           format: Optional[str] = None, precision: str = "f32", allow_float: bool = False, batch_size: int = 64,
           num_workers: int = 0, repeats: int = 5, threads: Optional[int] = None, with_torch: bool = True,
           progress: bool = True, log: Callable[[str], None] = lambda m: None, float_model=None,
           float_name: str = "the float model") -> Deployment:
    """Export ``qmodel`` to ``out`` for ``runtime`` and re-check it there on ``dataset`` (see the module
    docstring). ``format``: the int8 graph (default: the runtime's own); ``precision``: OpenVINO's
    float layers; ``allow_float``: see :func:`ptq4vit.export.export_onnx`. ``float_model`` (named
    ``float_name``): the float timm model ``qmodel`` was quantized from (checked by its weights'
    digest); the float32 graph and every figure against float are then of it."""
    if float_model is not None:
        check_float_model(qmodel, float_model, float_name)
    rt = get_runtime(runtime)
    fmt = format or rt.formats[0]
    if fmt not in rt.formats:
        raise UserError(f"{rt.label} runs the {' or '.join(rt.formats)} int8 graph, not {fmt!r}")
    if repeats < 1:
        raise UserError(f"repeats must be at least 1, got {repeats}")
    out = os.fspath(out)
    report = export_onnx(qmodel, out, format=fmt, allow_float=allow_float)
    log(f"wrote {out}; compiling it on {rt.label}")
    tmp = None
    if float_out is None:
        tmp = tempfile.TemporaryDirectory(prefix="ptq4vit-deploy-")
        float_out = os.path.join(tmp.name, "float32.onnx")
    try:
        export_onnx(qmodel if float_model is None else float_model, float_out, int8=False)
        int8_rt, float_rt = rt.load(out, threads, precision), rt.load(float_out, threads, precision)
        res = Deployment(rt, int8_rt.device, out, os.fspath(float_out), report, int8_rt.integer_kernels())
        if float_model is not None:
            res.float_source = f"{float_name}, the float model the checkpoint was quantized from (its weights' digest checked)"
            res.original_float = True
        _score(res, qmodel, dataset, int8_rt, float_rt, batch_size, num_workers, with_torch, progress, log)
        x = _first_images(dataset, batch_size)
        res.timing_batch, res.repeats = len(x), repeats
        log(f"timing float32 and int8 on {rt.label}, batch {len(x)}, {repeats} interleaved runs")
        times = time_interleaved({FLOAT: float_rt.timer(x), INT8: int8_rt.timer(x)}, repeats, warmup=1)
        res.median_ms = {k: float(np.median(v)) for k, v in times.items()}
        return res
    finally:
        if tmp is not None:
            tmp.cleanup()


def _score(res: Deployment, qmodel, dataset, int8_rt, float_rt, batch_size, num_workers, with_torch, progress,
           log) -> None:
    """Top-1 of each variant and their fidelity to the float32 graph, in one pass over ``dataset``."""
    logits: dict = {FLOAT: [], INT8: []}
    if with_torch:
        logits[TORCH] = []
    labels = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(dataset), desc=f"deploy on {res.runtime.label}", unit="img", dynamic_ncols=True)
    qmodel.eval()
    for batch in make_loader(dataset, batch_size=batch_size, num_workers=num_workers):
        res.n_skipped += len(batch.skipped)
        if batch.images is not None:
            x = batch.images.float()
            xs = x.numpy()
            logits[FLOAT].append(torch.from_numpy(float_rt.run(xs)))
            logits[INT8].append(torch.from_numpy(int8_rt.run(xs)))
            if with_torch:
                with torch.no_grad():
                    logits[TORCH].append(qmodel(x).float())
            labels.append(batch.labels)
        if bar is not None:
            bar.update(len(batch) + len(batch.skipped))
    if bar is not None:
        bar.close()
    if not labels:
        raise UserError("no readable images to check the deployed file on")
    y = torch.cat(labels)
    out = {k: torch.cat(v) for k, v in logits.items()}
    res.n_images = len(y)
    res.top1 = {k: 100.0 * float((v.argmax(-1) == y).double().mean()) for k, v in out.items()}
    res.vs_float = {k: fidelity(out[FLOAT], out[k]) for k in out if k != FLOAT}
    if with_torch:
        res.torch_agreement = top1_agreement(out[TORCH], out[INT8])


def _first_images(dataset, n: int) -> np.ndarray:
    """The first ``n`` readable images of ``dataset`` as one float32 batch (what the timing runs on)."""
    for batch in make_loader(dataset, batch_size=n):
        if batch.images is not None:
            return np.ascontiguousarray(batch.images.float().numpy())
    raise UserError("no readable images to time the deployed file on")


def _table(rows: list, right: set) -> list:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)).rstrip()
            for r in rows]


def format_deployment(d: Deployment, images_from: str = "", how_to_pass_float: str = "") -> str:
    """What ``ptq4vit deploy`` prints: where every site runs, then the re-check and the timing, and
    what the float32 graph is; ``how_to_pass_float`` tells how to give the original float model when
    it was not given."""
    rep = d.report
    n_int = sum(s.integer for s in rep.sites)
    lines = [f"{d.path}: int8 ONNX ({rep.format}) on {d.runtime.label} ({d.device})",
             f"where the sites run: {n_int} of {len(rep.sites)} in integers, {len(rep.sites) - n_int} in float; "
             f"{d.runtime.label} runs {d.integer_kernels} integer product kernels"]
    rows = [("site kind", "integer", "float")]
    rows += [(kind, str(i), str(f)) for kind, (i, f) in rep.placement().items()]
    lines += _table(rows, {1, 2})
    groups: dict = {}
    for s in rep.fallbacks:
        groups.setdefault((s.kind, s.reason), []).append(s.name)
    for (kind, reason), names in groups.items():
        lines.append(f"  float {kind}: {', '.join(names)}: {reason}")
    for t in rep.float_transforms:
        lines.append(f"  float transform: {t.name}: {t.what}")
    lines.append("")
    lines.append(f"{d.n_images} images{' of ' + images_from if images_from else ''}"
                 + (f" ({d.n_skipped} unreadable skipped)" if d.n_skipped else "")
                 + f"; agreement and KL against the float32 graph on {d.runtime.label}; "
                 f"time: median of {d.repeats} runs of one batch of {d.timing_batch}")
    rows = [("variant", "top-1 %", "agree %", "KL", "median ms", "img/s")]
    for k in (FLOAT, INT8, TORCH):
        if k not in d.top1:
            continue
        fid = d.vs_float.get(k, {"agreement": 100.0, "kl": 0.0})
        ms = d.median_ms.get(k)
        label = f"{k} ({'torch, CPU' if k == TORCH else d.runtime.label})"
        rows.append((label, f"{d.top1[k]:.2f}", f"{fid['agreement']:.2f}", f"{fid['kl']:.4f}",
                     "-" if ms is None else f"{ms:.2f}", "-" if ms is None else f"{d.timing_batch / (ms / 1000):.1f}"))
    lines += _table(rows, {1, 2, 3, 4, 5})
    if d.speedup is not None:
        lines.append(f"int8/float32 speed on {d.runtime.label}: {d.speedup:.2f}x")
    if d.torch_agreement is not None:
        lines.append(f"int8 file vs the fake-quantized torch model: top-1 agreement {d.torch_agreement:.2f}%")
    foot = f"float32: {d.float_source}"
    if not d.original_float:
        foot += ", not the original float weights" + (f"; {how_to_pass_float}" if how_to_pass_float else "")
    lines.append(foot)
    return "\n".join(lines)

"""Speed and agreement of a quantized model as float32 ONNX, int8 ONNX and fake-quantized torch.

:func:`benchmark` exports both ONNX graphs, then for each execution provider and batch size
times the three variants *interleaved* (one run of each in turn, repeated), so that load from
other processes on the machine hits all of them alike; it reports median and best latency,
throughput and the int8/float32 speed ratio. With ``openvino="f32"`` (or ``"default"``, the
plugin's own float precision, bf16 on CPUs with it) the float32 graph and the standard QDQ int8
graph also run on OpenVINO, timed in the same CPU loop (``float32-openvino``, ``int8-openvino``). With images it also reports the top-1 of each
variant (with labels), the top-1 agreement of int8 ONNX with the fake-quantized torch model and
the largest logit difference between them. :func:`op_breakdown` says where the time goes.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..quantized import QuantizedModel
from .onnx import ExportReport, export_onnx
from .ort import available_providers, make_session, profile_ops

__all__ = ["benchmark", "BenchResult", "op_breakdown", "compare_outputs", "format_bench", "time_interleaved",
           "RUNTIME_OF"]

VARIANTS = ("float32-onnx", "int8-onnx", "fakequant-torch", "float32-openvino", "int8-openvino")
#: The runtime each variant runs on, as printed.
RUNTIME_OF = {"float32-onnx": "ONNX Runtime", "int8-onnx": "ONNX Runtime", "fakequant-torch": "torch",
              "float32-openvino": "OpenVINO", "int8-openvino": "OpenVINO"}
#: The device OpenVINO and torch run on in :func:`benchmark` (ONNX Runtime rows name their provider).
CPU = "CPU"


@dataclass
class BenchResult:
    model: str
    int8_report: ExportReport
    timings: list = field(default_factory=list)      # dicts: runtime, provider, batch, variant, median_ms, best_ms, images_per_s
    accuracy: dict = field(default_factory=dict)     # variant -> top-1 %, when labels were given
    agreement: dict = field(default_factory=dict)    # n_images, top1_agreement %, max_abs_logit_error ...
    onnx_paths: dict = field(default_factory=dict)
    threads: Optional[int] = None
    openvino_precision: str = ""     # float precision OpenVINO ran at ("f32", "bf16"), when it ran

    def ratio(self, provider: str, batch: int, stat: str = "median_ms", runtime: str = "onnx") -> Optional[float]:
        """float32 time / int8 time on ``runtime`` (``"onnx"`` or ``"openvino"``; > 1: int8 is faster).
        ``provider``: the ONNX Runtime provider of the rows, or ``"CPU"`` for OpenVINO's."""
        t = {r["variant"]: r[stat] for r in self.timings if r["provider"] == provider and r["batch"] == batch}
        f, i = f"float32-{runtime}", f"int8-{runtime}"
        if f in t and i in t:
            return t[f] / t[i]
        return None


def compare_outputs(ref: np.ndarray, out: np.ndarray) -> dict:
    """Top-1 agreement and logit differences of ``out`` against ``ref`` (both (N, classes))."""
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    return {"n_images": int(len(ref)), "top1_agreement": float(100.0 * np.mean(out.argmax(1) == ref.argmax(1))),
            "max_abs_logit_error": float(diff.max()) if diff.size else 0.0,
            "mean_abs_logit_error": float(diff.mean()) if diff.size else 0.0,
            "max_abs_logit": float(np.abs(ref).max()) if ref.size else 0.0}


@torch.no_grad()
def _torch_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    model.eval()
    out = [model(images[i:i + batch_size]).float().cpu().numpy() for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


def time_interleaved(fns: dict, repeats: int, warmup: int = 2, min_seconds: float = 0.0) -> dict:
    """Milliseconds of each run of every ``fns`` entry (no arguments), timed one of each in turn so that
    load from other processes hits all of them alike; at least ``repeats`` runs each, after ``warmup``."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict = {k: [] for k in fns}
    start = time.perf_counter()
    while min(len(v) for v in times.values()) < repeats or time.perf_counter() - start < min_seconds:
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1000)
    return times


def benchmark(qmodel: QuantizedModel, *, images: Optional[torch.Tensor] = None, labels: Optional[Sequence[int]] = None,
              float_model: Optional[nn.Module] = None, batch_sizes: Sequence[int] = (1, 8),
              providers: Optional[Sequence[str]] = None, threads: Optional[int] = None, repeats: int = 10,
              warmup: int = 2, min_seconds: float = 0.0, include_torch: bool = True, workdir: Optional[str] = None,
              gemm: str = "portable", twin_combine: str = "gemm", eval_batch: int = 50, spinning: bool = True,
              format: str = "contrib", openvino: Optional[str] = None, allow_float: bool = False,
              log: Callable[[str], None] = lambda m: None) -> BenchResult:
    """Export and time ``qmodel`` (see the module docstring).

    Args:
        images: evaluation images ``(N, 3, H, W)`` already transformed, for top-1/agreement.
        labels: their classes (top-1 of each variant is reported when given).
        float_model: the float model for the float32 ONNX graph (default: ``qmodel`` with its
            quantizers off; after :func:`ptq4vit.load` those weights are the dequantized ones).
        providers: ONNX Runtime execution providers (default: CUDA when present, and CPU).
        threads: intra-op threads for ORT and torch (default: their own choice).
        spinning: let ORT's idle threads busy-wait (ORT's default); turn off on a shared machine.
        format: the int8 graph ONNX Runtime runs: ``"contrib"`` or ``"qdq"`` (see :func:`export_onnx`).
        openvino: also run on OpenVINO at this precision (``"f32"``, ``"bf16"``, ``"default"``).
        allow_float: time an int8 graph in which no site runs in integers (see :func:`export_onnx`).
    """
    providers = list(providers or available_providers())
    workdir = workdir or tempfile.mkdtemp(prefix="ptq4vit-bench-")
    os.makedirs(workdir, exist_ok=True)
    fp32_path = os.path.join(workdir, "model_float32.onnx")
    int8_path = os.path.join(workdir, "model_int8.onnx")
    log(f"exporting {qmodel.name} to {workdir}")
    rep = export_onnx(qmodel, int8_path, gemm=gemm, twin_combine=twin_combine, format=format, allow_float=allow_float)
    export_onnx(float_model if float_model is not None else qmodel, fp32_path, int8=False)
    res = BenchResult(qmodel.name, rep, onnx_paths={"float32-onnx": fp32_path, "int8-onnx": int8_path}, threads=threads)
    ov_models: dict = {}
    if openvino is not None:
        from .openvino import compile_onnx
        qdq_path = int8_path
        if format != "qdq":
            qdq_path = os.path.join(workdir, "model_int8_qdq.onnx")
            export_onnx(qmodel, qdq_path, format="qdq", allow_float=allow_float)
        res.onnx_paths["int8-openvino"] = qdq_path
        ov_models = {"float32-openvino": compile_onnx(fp32_path, openvino, threads),
                     "int8-openvino": compile_onnx(qdq_path, openvino, threads)}
        res.openvino_precision = ov_models["int8-openvino"].precision
    input_shape = rep.input_shape[1:]
    tq = None
    lab = None if labels is None else np.asarray(labels)
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for provider in providers:
            sessions = {"float32-onnx": make_session(fp32_path, provider, threads, spinning=spinning),
                        "int8-onnx": make_session(int8_path, provider, threads, spinning=spinning)}
            if "CUDAExecutionProvider" in provider and "CUDAExecutionProvider" not in sessions["int8-onnx"].get_providers():
                log(f"{provider} not usable, skipped")
                continue
            for b in batch_sizes:
                x = np.random.default_rng(0).standard_normal((b, *input_shape)).astype(np.float32)
                fns = {k: (lambda s=s: s.run(None, {"input": x})) for k, s in sessions.items()}
                if provider == "CPUExecutionProvider":
                    for k, m in ov_models.items():
                        fns[k] = lambda r=m.infer_request(): r.infer([x])
                if include_torch and provider == "CPUExecutionProvider":
                    xt = torch.from_numpy(x)

                    def run_torch(xt=xt):
                        with torch.no_grad():
                            qmodel(xt)
                    fns["fakequant-torch"] = run_torch
                log(f"timing {provider} batch {b} ({', '.join(fns)}; {repeats} interleaved runs)")
                times = time_interleaved(fns, repeats, warmup, min_seconds)
                for k, v in times.items():
                    med = float(np.median(v))
                    res.timings.append({"runtime": RUNTIME_OF[k], "provider": provider if k.endswith("-onnx") else CPU,
                                        "batch": b, "variant": k, "median_ms": med,
                                        "best_ms": float(min(v)), "images_per_s": b / (med / 1000), "runs": len(v)})
            if images is not None:
                if tq is None:
                    tq = _torch_logits(qmodel, images, eval_batch)
                    if labels is not None:
                        res.accuracy["fakequant-torch"] = float(100.0 * np.mean(tq.argmax(1) == lab))
                xs = images.detach().float().cpu().numpy()
                suffix = "" if provider == "CPUExecutionProvider" else f" ({provider})"
                runs = {k: (lambda b, s=s: s.run(None, {"input": b})[0]) for k, s in sessions.items()}
                if provider == "CPUExecutionProvider":
                    runs.update({k: m.run for k, m in ov_models.items()})
                for k, run in runs.items():
                    o = np.concatenate([run(xs[i:i + eval_batch]) for i in range(0, len(xs), eval_batch)])
                    if labels is not None:
                        res.accuracy[k + suffix] = float(100.0 * np.mean(o.argmax(1) == lab))
                    if k == "int8-onnx":
                        res.agreement[provider] = compare_outputs(tq, o)
                    elif k == "int8-openvino":
                        res.agreement[f"OpenVINO ({res.openvino_precision})"] = compare_outputs(tq, o)
    finally:
        torch.set_num_threads(prev_threads)
    return res


def op_breakdown(path: str, input_shape: Sequence[int], batch: int, threads: Optional[int] = None,
                 runs: int = 3, top: int = 12, spinning: bool = True) -> str:
    """ORT profiler time per operator type, as text lines (where the time goes)."""
    prof = profile_ops(path, input_shape, batch, runs=runs, threads=threads, spinning=spinning)
    total = prof["total_ms"] or 1.0
    lines = [f"  {op:<24s} {ms:8.1f} ms  {100 * ms / total:5.1f}%  [{', '.join(prof['providers'].get(op, []))}]"
             for op, ms in list(prof["ops"].items())[:top]]
    return "\n".join([f"  (sum of kernel times per run: {total:.1f} ms)"] + lines)


def format_bench(res: BenchResult) -> str:
    lines = [f"model {res.model}" + (f", {res.threads} threads" if res.threads else "")]
    lines.append(f"{'runtime':<12s} {'provider':<22s} {'batch':>5s} {'variant':<16s} {'median ms':>10s} {'best ms':>9s} "
                 f"{'img/s':>8s}")
    for r in res.timings:
        lines.append(f"{r['runtime']:<12s} {r['provider']:<22s} {r['batch']:>5d} {r['variant']:<16s} "
                     f"{r['median_ms']:>10.1f} {r['best_ms']:>9.1f} {r['images_per_s']:>8.1f}")
    seen = sorted({(r["provider"], r["batch"]) for r in res.timings})
    for prov, b in seen:
        rm, rb = res.ratio(prov, b), res.ratio(prov, b, "best_ms")
        if rm is not None:
            lines.append(f"int8/float32 ONNX Runtime speed ratio ({prov}, batch {b}): {rm:.2f}x (median), "
                         f"{rb:.2f}x (best)")
        rm, rb = res.ratio(prov, b, runtime="openvino"), res.ratio(prov, b, "best_ms", runtime="openvino")
        if rm is not None:
            lines.append(f"int8/float32 OpenVINO speed ratio ({res.openvino_precision} float layers, batch {b}): "
                         f"{rm:.2f}x (median), {rb:.2f}x (best)")
    for k, v in res.accuracy.items():
        lines.append(f"top-1 {k}: {v:.2f}%")
    for prov, a in res.agreement.items():
        where = prov if prov.startswith("OpenVINO") else f"ONNX Runtime {prov}"
        lines.append(f"int8 vs fake-quant torch ({where}, {a['n_images']} images): top-1 agreement "
                     f"{a['top1_agreement']:.2f}%, max |logit error| {a['max_abs_logit_error']:.4g} "
                     f"(mean {a['mean_abs_logit_error']:.3g}, max |logit| {a['max_abs_logit']:.3g})")
    return "\n".join(lines)

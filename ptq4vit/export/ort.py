"""ONNX Runtime sessions for exported models: run, time, profile, and check which kernels ran."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Optional, Sequence

import numpy as np

__all__ = ["available_providers", "make_session", "run_batches", "profile_ops",
           "optimized_op_counts", "INTEGER_OPS"]

#: ONNX / ORT operators that compute integer products.
INTEGER_OPS = ("MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul", "QLinearConv", "ConvInteger",
               "DynamicQuantizeMatMul", "QGemm")


def available_providers() -> list[str]:
    """CPU, plus CUDA when onnxruntime was built with it (onnxruntime-gpu)."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


def _for_this_cpu(path: str, vnni: Optional[bool]):
    """The model to load: ``path`` itself, or (a ptq4vit int8 file whose GEMM operand types this
    CPU should change, :mod:`.kernels`) the rewritten model as bytes."""
    import onnx

    from .cpu import cpu_has_vnni
    from .kernels import adapt_for_cpu

    model = onnx.load(path)
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("producer") != "ptq4vit" or meta.get("ptq4vit.int8") != "1":
        return path
    n = adapt_for_cpu(model, cpu_has_vnni() if vnni is None else vnni)
    return model.SerializeToString() if n else path


def make_session(path: str, provider: str = "CPUExecutionProvider", threads: Optional[int] = None,
                 profile: bool = False, optimized_model_path: Optional[str] = None, spinning: bool = True,
                 vnni: Optional[bool] = None):
    """An ORT session with all graph optimizations. ``spinning=False`` stops idle intra-op threads
    from busy-waiting, which helps a lot when other processes compete for the cores.

    A ptq4vit int8 file gets the integer GEMM operand types of this CPU (``vnni``: None = detect):
    exact u8×u8 for full-range products without VNNI, fast u8×s8 with it (:mod:`.kernels`)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # ORT's warnings about unused initializers etc. are noise here
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="ptq4vit-ort-"), "profile")
    if optimized_model_path:
        so.optimized_model_filepath = optimized_model_path
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    model = _for_this_cpu(os.fspath(path), vnni) if provider == "CPUExecutionProvider" else os.fspath(path)
    return ort.InferenceSession(model, so, providers=providers)


def run_batches(session, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits for ``images`` (N, C, H, W float32), in batches."""
    name = session.get_inputs()[0].name
    out = [session.run(None, {name: np.ascontiguousarray(images[i:i + batch_size], dtype=np.float32)})[0]
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


def profile_ops(path: str, input_shape: Sequence[int], batch: int, runs: int = 5, threads: Optional[int] = None,
                provider: str = "CPUExecutionProvider", spinning: bool = True) -> dict:
    """Time per operator type (ms per run, summed over nodes) from ORT's profiler, plus the
    kernels that actually ran: ``{"ops": {op: ms}, "total_ms": ..., "providers": {op: [provider]}}``."""
    sess = make_session(path, provider, threads, profile=True, spinning=spinning)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, *input_shape)).astype(np.float32)
    sess.run(None, {name: x})  # warm-up, excluded below
    for _ in range(runs):
        sess.run(None, {name: x})
    prof = sess.end_profiling()
    with open(prof) as f:
        events = json.load(f)
    os.remove(prof)
    per_op: dict = {}
    providers: dict = {}
    for ev in events:
        if ev.get("cat") == "Session" and ev.get("name") == "model_run":
            continue
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        args = ev.get("args", {})
        op = args.get("op_name", "?")
        per_op.setdefault(op, []).append(ev["dur"] / 1000.0)
        providers.setdefault(op, set()).add(args.get("provider", "?"))
    # the first run (warm-up) is included in the events: scale by runs / (runs + 1)
    ops = {op: sum(v) / (runs + 1) for op, v in per_op.items()}
    ops = dict(sorted(ops.items(), key=lambda kv: -kv[1]))
    return {"ops": ops, "total_ms": sum(ops.values()), "providers": {k: sorted(v) for k, v in providers.items()}}


def optimized_op_counts(path: str, provider: str = "CPUExecutionProvider") -> dict:
    """Operator counts of the graph ORT actually runs (after its graph optimizations)."""
    import onnx

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "optimized.onnx")
        make_session(path, provider, optimized_model_path=out)
        model = onnx.load(out)
    counts: dict = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

"""The runtimes an exported file is deployed on, by name: which int8 graph each one runs, how a file
is loaded on it, and how many of its product kernels compute in integers once it is compiled.

A runtime is one :class:`Runtime` entry in :data:`RUNTIMES`; :func:`register_runtime` adds one
(``ptq4vit deploy --runtime NAME`` then knows it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..errors import UserError

__all__ = ["Runtime", "Loaded", "RUNTIMES", "register_runtime", "get_runtime"]


@dataclass
class Loaded:
    """An exported file compiled on a runtime."""
    run: Callable[[np.ndarray], np.ndarray]               # images (N, C, H, W) float32 -> logits
    timer: Callable[[np.ndarray], Callable[[], object]]   # a batch -> a call with no arguments that runs it
    device: str                                           # where it runs, in words
    integer_kernels: Callable[[], int]                    # product kernels the runtime runs in integers


@dataclass(frozen=True)
class Runtime:
    name: str            # as on the command line
    label: str           # as printed
    formats: tuple       # int8 graph formats it runs (see export_onnx); the first is its default
    load: Callable[..., Loaded]   # (path, threads=None, precision="f32") -> Loaded


RUNTIMES: dict = {}


def register_runtime(runtime: Runtime) -> Runtime:
    RUNTIMES[runtime.name] = runtime
    return runtime


def get_runtime(name: str) -> Runtime:
    try:
        return RUNTIMES[name]
    except KeyError:
        raise UserError(f"unknown runtime {name!r}: expected one of {', '.join(RUNTIMES)}") from None


def _load_onnxruntime(path: "str | os.PathLike", threads: Optional[int] = None, precision: str = "f32") -> Loaded:
    """ONNX Runtime on the CPU (float layers always in float32: ``precision`` has no choice to make)."""
    from .ort import INTEGER_OPS, make_session, optimized_op_counts
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UserError("ONNX Runtime is not installed; pip install 'ptq4vit[export]'") from None
    path = os.fspath(path)
    session = make_session(path, "CPUExecutionProvider", threads)

    def run(x):
        return session.run(None, {"input": np.ascontiguousarray(x, dtype=np.float32)})[0]

    def integer_kernels():
        return sum(n for op, n in optimized_op_counts(path).items() if op in INTEGER_OPS)
    return Loaded(run, lambda x: (lambda: session.run(None, {"input": x})), "CPUExecutionProvider", integer_kernels)


def _load_openvino(path: "str | os.PathLike", threads: Optional[int] = None, precision: str = "f32") -> Loaded:
    """OpenVINO's CPU plugin, float layers at ``precision`` (see :func:`.openvino.compile_onnx`)."""
    from .openvino import INTEGER_PRECISIONS, compile_onnx, executed_layers
    model = compile_onnx(path, precision, threads)

    def timer(x):
        request = model.infer_request()
        return lambda: request.infer([x])

    def integer_kernels():
        return sum(1 for _, prec, _ in executed_layers(model) if prec in INTEGER_PRECISIONS)
    return Loaded(model.run, timer, f"CPU, float layers in {model.precision}", integer_kernels)


register_runtime(Runtime("onnxruntime", "ONNX Runtime", ("contrib", "qdq"), _load_onnxruntime))
register_runtime(Runtime("openvino", "OpenVINO", ("qdq",), _load_openvino))

"""OpenVINO as a runtime for exported ONNX files: compile with an explicit precision, run, and
read which layers executed in integers.

OpenVINO's CPU plugin runs float layers in bf16 by default on CPUs that have it (AVX512-BF16,
AMX): :func:`compile_onnx` therefore always takes a precision, ``"f32"`` (float layers in
float32, comparable with ONNX Runtime) or ``"default"`` (the plugin's own choice, reported by
:attr:`OpenVINOModel.precision`). Needs the ``openvino`` extra.

On x86 CPUs without VNNI (AVX2 only) the plugin's u8×s8 kernels saturate pairs of products at
int16, as ONNX Runtime's do, and OpenVINO has no load-time rewrite like
:func:`ptq4vit.export.ort.make_session`'s: a product whose 8-bit left operand spans all 256 codes
can come out wrong (OpenVINO documents this "saturation issue"; its workaround is 7-bit weights at
quantization time). :func:`compile_onnx` then warns once per compiled int8 model, and
:attr:`OpenVINOModel.int8_exact` says so (docs/deployment.md).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import UserError
from .cpu import cpu_name, u8s8_saturates

__all__ = ["PRECISIONS", "OpenVINOModel", "compile_onnx", "executed_layers", "INTEGER_PRECISIONS"]

#: ``"f32"``: INFERENCE_PRECISION_HINT=f32; ``"bf16"``: forced bf16; ``"default"``: no hint.
PRECISIONS = ("f32", "bf16", "default")
#: Runtime precisions of a layer that computes in integers.
INTEGER_PRECISIONS = ("i8", "u8")
#: Layer types that carry a model's products.
PRODUCT_LAYERS = ("FullyConnected", "MatMul", "Convolution")


@dataclass
class OpenVINOModel:
    """A compiled model: call :meth:`run` like an ONNX Runtime session's ``run``."""
    compiled: object
    precision: str        # the precision the plugin runs float layers in (read back after compiling)
    hint: str             # what was asked for
    int8_exact: bool = True  # False on an x86 CPU without VNNI when the model has integer layers (they may saturate)

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.compiled(np.ascontiguousarray(images, dtype=np.float32))[0]

    def infer_request(self):
        """A reusable request (lower overhead per call, for timing loops)."""
        return self.compiled.create_infer_request()


def compile_onnx(path: "str | os.PathLike", precision: str = "f32", threads: Optional[int] = None,
                 latency: bool = True) -> OpenVINOModel:
    """Compile an ONNX file for OpenVINO's CPU plugin with an explicit float precision."""
    if precision not in PRECISIONS:
        raise UserError(f"OpenVINO precision must be one of {PRECISIONS}, got {precision!r}")
    try:
        import openvino as ov
    except ImportError:
        raise UserError("OpenVINO is not installed; pip install 'ptq4vit[openvino]'") from None
    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY" if latency else "THROUGHPUT"}
    if precision != "default":
        config["INFERENCE_PRECISION_HINT"] = precision
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    compiled = core.compile_model(core.read_model(os.fspath(path)), "CPU", config)
    actual = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    model = OpenVINOModel(compiled, {"<Type: 'float32'>": "f32", "<Type: 'bfloat16'>": "bf16",
                                     "<Type: 'float16'>": "f16"}.get(actual, actual), precision)
    if u8s8_saturates() and any(prec in INTEGER_PRECISIONS for _, prec, _ in executed_layers(model)):
        model.int8_exact = False
        warnings.warn(f"{os.fspath(path)}: this CPU ({cpu_name()}) has no VNNI, so OpenVINO's int8 products may "
                      f"saturate and differ from the quantized model; ONNX Runtime (ptq4vit.export.ort.make_session) "
                      f"stays exact here", RuntimeWarning, stacklevel=2)
    return model


def executed_layers(model: OpenVINOModel, layer_types=PRODUCT_LAYERS) -> list:
    """``(layer type, runtime precision, original ONNX node names)`` of every executed layer of the
    given types, from the plugin's runtime graph (what actually runs after its transformations)."""
    out = []
    for op in model.compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind in layer_types:
            out.append((kind, info["runtimePrecision"].astype(str), info["originalLayersNames"].astype(str)))
    return out

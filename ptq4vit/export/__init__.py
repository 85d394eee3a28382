"""Deployment: ONNX export with integer semantics, ONNX Runtime sessions and benchmarks.

Needs the ``export`` extra (``onnx``, ``onnxruntime``); nothing here is imported by ``ptq4vit`` itself.
"""
from .cpu import cpu_has_vnni
from .onnx import FORMATS, GEMM_MODES, TWIN_COMBINES, export_onnx
from .report import AllFloatError, ExportReport, FloatTransform, SiteExport

__all__ = ["export_onnx", "FORMATS", "ExportReport", "AllFloatError", "SiteExport", "FloatTransform", "cpu_has_vnni", "GEMM_MODES", "TWIN_COMBINES"]

"""Deployment: ONNX export with integer semantics, ONNX Runtime sessions and benchmarks.

Needs the ``export`` extra (``onnx``, ``onnxruntime``); nothing here is imported by ``ptq4vit`` itself.
"""
from .onnx import GEMM_MODES, TWIN_COMBINES, ExportReport, SiteExport, cpu_has_vnni, export_onnx

__all__ = ["export_onnx", "ExportReport", "SiteExport", "cpu_has_vnni", "GEMM_MODES", "TWIN_COMBINES"]

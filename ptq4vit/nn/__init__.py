"""Quantized modules: QuantLinear, QuantConv2d and QuantMatMul; FloatMatMul where a preset keeps a matmul float."""
from .modules import QUANT_MODULES, FloatMatMul, QuantConv2d, QuantLinear, QuantMatMul, QuantSite

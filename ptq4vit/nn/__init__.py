"""Quantized modules: QuantLinear, QuantConv2d and QuantMatMul."""
from .modules import QUANT_MODULES, QuantConv2d, QuantLinear, QuantMatMul

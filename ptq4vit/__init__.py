"""ptq4vit: post-training quantization of vision transformers (BasePTQ and PTQ4ViT)."""
from .api import quantize, save_qparams
from .checkpoint import load
from .presets import ABLATION_ROWS, PRESETS, Preset, get_preset
from .quantized import QuantizedModel

__version__ = "0.1.0"
__all__ = ["quantize", "save_qparams", "load", "QuantizedModel", "Preset", "PRESETS", "ABLATION_ROWS", "get_preset", "__version__"]

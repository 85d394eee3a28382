"""timm adapters: where the quantization sites of ViT/DeiT and Swin live."""
from .attention import QuantAttention, QuantWindowAttention
from .wrap import SUPPORTED_MODELS, UnsupportedModelError, insert_quant_sites

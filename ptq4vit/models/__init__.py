"""Model adapters: one per model family, in one registry; they say where the quantization sites are, where
a rotation folds, and how a checkpoint rebuilds the float model. ``quantize``/``save``/``load`` take a
registry as ``adapters=`` (default :data:`DEFAULT_ADAPTERS`: timm's ViT/DeiT and Swin)."""
from ..errors import UnsupportedModelError
from ..transforms.rotation_layout import (AttentionHeads, BlockRotation, NormReaders, OnlineSlot, ResidualBranch,
                                          ResidualStream, RotationLayout)
from .adapter import ACTIVATIONS, DROPOUTS, NORMS, Adapter, SitePlan, check_affine_norm
from .attention import QuantAttention
from .registry import DEFAULT_ADAPTERS, AdapterRegistry, check_image_size, insert_quant_sites, norm_linear_pairs
from .sites import SiteBuilder
from .swin import QuantWindowAttention, SwinAdapter
from .vit import VitAdapter

#: The model classes the default adapters handle.
SUPPORTED_MODELS = DEFAULT_ADAPTERS.model_classes

__all__ = ["Adapter", "SitePlan", "SiteBuilder", "NORMS", "DROPOUTS", "ACTIVATIONS", "check_affine_norm", "AdapterRegistry", "DEFAULT_ADAPTERS", "SUPPORTED_MODELS",
           "insert_quant_sites", "norm_linear_pairs", "UnsupportedModelError", "VitAdapter", "SwinAdapter",
           "QuantAttention", "QuantWindowAttention", "RotationLayout", "BlockRotation", "AttentionHeads", "OnlineSlot",
           "ResidualStream", "ResidualBranch", "NormReaders"]

"""Model adapters: one per timm family, in one registry; they say where the quantization sites are."""
from ..errors import UnsupportedModelError
from .adapter import Adapter, SitePlan
from .registry import DEFAULT_ADAPTERS, AdapterRegistry, check_image_size, insert_quant_sites, norm_linear_pairs
from .sites import SiteBuilder
from .swin import QuantWindowAttention, SwinAdapter
from .vit import QuantAttention, VitAdapter

#: The model classes the default adapters handle.
SUPPORTED_MODELS = DEFAULT_ADAPTERS.model_classes

"""ptq4vit: post-training quantization of vision transformers (BasePTQ, PTQ4ViT and beyond).

The library: :func:`quantize` a timm model, :func:`save` and :func:`load` the result, optionally
:func:`reconstruct` it first (learned rounding and steps); an
:class:`Adapter` in an :class:`AdapterRegistry` (``adapters=``) adds a model family. The
experiment harness (datasets, model names, runs, reports, the command line) lives in
:mod:`ptq4vit.harness` and is not imported here.
"""
__version__ = "0.2.0"

from .api import quantize
from .calib.reconstruct import ReconstructionReport, reconstruct
from .recipes.reconstruction import Reconstruction
from .checkpoint import load, save
from .errors import CheckpointError, PTQ4ViTError, UnsupportedModelError, UserError
from .models import DEFAULT_ADAPTERS, Adapter, AdapterRegistry, SitePlan
from .presets import PRESETS, Preset, get_preset
from .quantized import QuantizedModel, write_qparams_json
from .recipes import RECIPES, Recipe, get_recipe

__all__ = ["quantize", "reconstruct", "Reconstruction", "ReconstructionReport", "save", "load", "write_qparams_json",
           "QuantizedModel", "Recipe", "RECIPES", "get_recipe", "Preset", "PRESETS", "get_preset", "DEFAULT_ADAPTERS",
           "AdapterRegistry", "Adapter", "SitePlan", "PTQ4ViTError", "UserError", "UnsupportedModelError", "CheckpointError",
           "__version__"]

"""Recipes: the quantization method as a few small typed components (see :mod:`.recipe`)."""
from .calibration import MSE, Cosine, GridSearch, Hessian, Percentile
from .flat import FLAT_PATHS, Preset
from .named import RECIPES, from_flat, get_recipe
from .operands import FloatAttention, LogGelu, LogSoftmax, TwinGelu, TwinSoftmax, UniformGelu, UniformSoftmax
from .recipe import Recipe, path_hint
from .reconstruction import NoReconstruction, Reconstruction
from .transforms import TRANSFORM_ORDER, BiasCorrection, LayerNormReparam, Rotation, Smoothing
from .weights import GPTQ, Nearest, Weights

__all__ = ["Recipe", "RECIPES", "get_recipe", "path_hint", "Preset", "from_flat", "FLAT_PATHS", "GridSearch",
           "Percentile", "Hessian", "Cosine", "MSE", "Weights", "Nearest", "GPTQ", "UniformSoftmax", "TwinSoftmax",
           "LogSoftmax", "FloatAttention", "UniformGelu", "TwinGelu", "LogGelu", "Rotation", "Smoothing",
           "LayerNormReparam", "BiasCorrection", "TRANSFORM_ORDER", "NoReconstruction", "Reconstruction"]

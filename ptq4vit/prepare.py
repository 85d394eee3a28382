"""Turn a float timm model into one with quantization sites, as a recipe describes it.

One place for everything a recipe changes in the model's structure: the function-preserving
rotations (before the sites exist), then the sites with the quantizers the recipe chooses
(:class:`~ptq4vit.models.sites.SiteBuilder`: granularity, twins, log softmax quantizer).
``quantize`` and checkpoint loading both build through here, so a saved model is rebuilt with
the same structure.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .models import DEFAULT_ADAPTERS, AdapterRegistry, insert_quant_sites, norm_linear_pairs
from .recipes import Recipe, get_recipe
from .recipes.flat import Preset
from .transforms import RotationOptions, apply_rotation
from .transforms.reparam import zero_bias


def prepare_sites(model: nn.Module, recipe: "Recipe | Preset", w_bits: int, a_bits: int, *,
                  adapters: AdapterRegistry = DEFAULT_ADAPTERS) -> "OrderedDict[str, nn.Module]":
    """Rotate (if asked) and insert the sites, in place; return the sites. The model's adapter in
    ``adapters`` says where everything is (and refuses a model it does not know).

    With the ln_reparam transform the linear layers it folds into get a (zero) bias if they have none,
    so a checkpoint's structure follows from the recipe (docs/lowbit.md §6). A flat :class:`Preset`
    is read as the recipe it means.
    """
    recipe = get_recipe(recipe)
    reparam = recipe.transform("ln_reparam") is not None
    pairs = norm_linear_pairs(model, adapters=adapters) if reparam else []  # refuses before the model is touched
    apply_rotation(model, RotationOptions.from_recipe(recipe), adapters=adapters)
    sites = insert_quant_sites(model, recipe, w_bits, a_bits, adapters=adapters)
    for _, linear in pairs:
        zero_bias(sites[linear])
    return sites

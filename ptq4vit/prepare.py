"""Turn a float timm model into one with quantization sites, as a preset describes it.

One place for everything a preset changes in the model's structure: the function-preserving
rotations (before the sites exist), then the sites with the quantizers the preset chooses
(:class:`~ptq4vit.models.sites.SiteBuilder`: granularity, twins, log softmax quantizer).
``quantize`` and checkpoint loading both build through here, so a saved model is rebuilt with
the same structure.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .models import DEFAULT_ADAPTERS, AdapterRegistry, insert_quant_sites, norm_linear_pairs
from .recipes import Recipe
from .recipes.flat import Preset
from .transforms import RotationOptions, apply_rotation
from .transforms.reparam import zero_bias


def prepare_sites(model: nn.Module, preset: "Recipe | Preset", w_bits: int, a_bits: int, *,
                  adapters: AdapterRegistry = DEFAULT_ADAPTERS) -> "OrderedDict[str, nn.Module]":
    """Rotate (if asked) and insert the sites, in place; return the sites. The model's adapter in
    ``adapters`` says where everything is (and refuses a model it does not know).

    With ``reparam_ln`` the linear layers it folds into get a (zero) bias if they have none, so a
    checkpoint's structure follows from the preset (docs/lowbit.md §6). A recipe is read through its
    flat view, as the engine reads it.
    """
    preset = preset.flat() if isinstance(preset, Recipe) else preset
    pairs = norm_linear_pairs(model, adapters=adapters) if preset.reparam_ln else []  # refuses before the model is touched
    apply_rotation(model, RotationOptions.from_preset(preset), adapters=adapters)
    sites = insert_quant_sites(model, preset, w_bits, a_bits, adapters=adapters)
    for _, linear in pairs:
        zero_bias(sites[linear])
    return sites

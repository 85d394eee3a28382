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

from .models import insert_quant_sites
from .presets import Preset
from .transforms import RotationOptions, apply_rotation


def prepare_sites(model: nn.Module, preset: Preset, w_bits: int, a_bits: int) -> "OrderedDict[str, nn.Module]":
    """Rotate (if asked) and insert the sites, in place; return the sites."""
    apply_rotation(model, RotationOptions.from_preset(preset))
    return insert_quant_sites(model, preset, w_bits, a_bits)

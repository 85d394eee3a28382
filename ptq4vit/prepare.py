"""Turn a float timm model into one with quantization sites, as a preset describes it.

One place for everything a preset changes in the model's structure: the function-preserving
rotations (before the sites exist), the sites themselves, per-channel weight scales and the
post-softmax log quantizer. ``quantize`` and checkpoint loading both build through here, so a
saved model is rebuilt with the same structure.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .models import QuantAttention, QuantWindowAttention, insert_quant_sites
from .nn.granularity import use_per_channel_weights
from .presets import Preset
from .quant import LogQuantizer
from .transforms import RotationOptions, apply_rotation


def prepare_sites(model: nn.Module, preset: Preset, w_bits: int, a_bits: int) -> "OrderedDict[str, nn.Module]":
    """Rotate (if asked), insert the sites and apply the preset's quantizer choices, in place; return the sites."""
    apply_rotation(model, RotationOptions.from_preset(preset))
    sites = insert_quant_sites(model, preset, w_bits, a_bits)
    if preset.w_granularity == "channel":
        use_per_channel_weights(sites)
    if preset.softmax_log != "none":
        for m in model.modules():
            if isinstance(m, (QuantAttention, QuantWindowAttention)):
                m.matmul2.a_quant = LogQuantizer(a_bits, preset.softmax_log)
    return sites

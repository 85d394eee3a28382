"""``quantize``: calibrate a float timm model and return it quantized."""
from __future__ import annotations

import copy
import logging
from typing import Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .calib import SEARCH_CHUNK_BYTES, calibrate_site, capture, default_memory_budget, estimate_site_bytes, plan_groups
from .errors import UserError
from .models import insert_quant_sites
from .presets import Preset, get_preset
from .quant import check_bits
from .quantized import QuantizedModel, model_name

logger = logging.getLogger(__name__)


def quantize(model: nn.Module, calib_images: torch.Tensor, preset: Union[str, Preset] = "ptq4vit", w_bits: int = 8,
             a_bits: int = 8, *, memory_budget: Optional[int] = None, capture_batch: int = 8, progress: bool = True,
             inplace: bool = False, **overrides) -> QuantizedModel:
    """Calibrate a float timm ViT/DeiT/Swin on ``calib_images`` and return the quantized model.

    Args:
        model: a float timm model (``VisionTransformer``, distilled DeiT or ``SwinTransformer``).
        calib_images: float tensor ``(N, 3, H, W)``, already transformed like eval images.
        preset: ``"base"``, ``"base-cosine"``, ``"official"``, ``"ptq4vit"`` or a :class:`Preset`.
        w_bits, a_bits: weight and activation bits, 2..8 each.
        memory_budget: bytes for captured activations and search temporaries (default: a
            quarter of the free memory of the calibration device).
        capture_batch: images per forward/backward pass while capturing.
        progress: show a progress bar over the sites.
        inplace: quantize ``model`` itself instead of a copy.
        **overrides: preset fields to change, e.g. ``metric="cosine"``, ``softmax_twin=False``.

    Calibration runs on the device of the model's parameters, with images in the model's
    floating dtype (float32, bfloat16 or float16; the scale search itself runs in float32);
    it is deterministic, so the same inputs give bit-identical scales. Scales are float32 and
    live on the model's device.
    """
    preset = get_preset(preset, **overrides)
    check_bits(w_bits, "w_bits")
    check_bits(a_bits, "a_bits")
    if not isinstance(calib_images, torch.Tensor) or calib_images.dim() != 4 or calib_images.shape[1] != 3:
        shape = tuple(calib_images.shape) if isinstance(calib_images, torch.Tensor) else type(calib_images).__name__
        raise UserError(f"calib_images must be a float tensor of shape (N, 3, H, W), got {shape}")
    if not calib_images.is_floating_point() or len(calib_images) == 0:
        raise UserError("calib_images must be a non-empty float tensor")

    name = model_name(model)
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    device, dtype = _device_and_dtype(model)
    # Images take the model's dtype: a bf16 model gets bf16 images (its convs refuse float32 input).
    images = calib_images.to(device=device, dtype=dtype)
    sites = insert_quant_sites(model, preset, w_bits, a_bits)
    qmodel = QuantizedModel(model, preset, w_bits, a_bits, name)

    budget = memory_budget if memory_budget is not None else default_memory_budget(device)
    grad_source = preset.grad_source if preset.metric == "hessian" else None
    with qmodel.quantization_disabled():
        per_image = estimate_site_bytes(model, images, sites, with_grad=grad_source is not None)
        half = budget // 2  # one half for captured activations, the other for search temporaries
        groups = plan_groups(per_image, len(images), half)
        logger.debug("%s: %d sites, %d capture pass(es) within a budget of %.1f MiB", name, len(sites), len(groups),
                     budget / 2 ** 20)
        bar = tqdm(total=len(sites), desc=f"calibrating {preset.name} W{w_bits}A{a_bits}", unit="layer",
                   disable=not progress)
        for group in groups:
            group_sites = {n: sites[n] for n in group}
            data = capture(model, images, group_sites, grad_source, capture_batch, preset.grad_chunk)
            for n in group:
                bar.set_postfix_str(n, refresh=False)
                site_data = data.pop(n)
                calibrate_site(sites[n], site_data.inputs, site_data.grad, preset, min(half, SEARCH_CHUNK_BYTES))
                bar.update()
            del data
        bar.close()
    return qmodel


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's parameters (its first floating parameter)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    raise UserError(f"model {type(model).__name__} has no floating-point parameters to quantize")

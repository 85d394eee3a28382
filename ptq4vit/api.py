"""``quantize``: calibrate a float timm model and return it quantized."""
from __future__ import annotations

import copy
import logging
from typing import Optional, Union

import torch
from torch import nn

from .calib import calibrate_model, default_memory_budget
from .calib.percentile import calibrate_percentile
from .calib.reconstruct import reconstruct
from .calib.units import bind_block_arguments, reconstruction_units
from .checkpoint import float_weights_digest
from .errors import UserError
from .finite import bad_scales, nonfinite_count
from .models import DEFAULT_ADAPTERS, AdapterRegistry, check_image_size, norm_linear_pairs
from .prepare import prepare_sites
from .recipes import Recipe, get_recipe
from .recipes.flat import Preset
from .quant import check_bits
from .quantized import QuantizedModel
from .typecheck import check_arguments

logger = logging.getLogger(__name__)


def quantize(model: nn.Module, calib_images: torch.Tensor, preset: Union[str, Recipe, Preset] = "ptq4vit", w_bits: int = 8,
             a_bits: int = 8, *, memory_budget: Optional[int] = None, capture_batch: int = 8, progress: bool = True,
             inplace: bool = False, threads: Optional[int] = None, adapters: AdapterRegistry = DEFAULT_ADAPTERS,
             reconstruction_images: Optional[torch.Tensor] = None, **overrides) -> QuantizedModel:
    """Calibrate a float timm ViT/DeiT/Swin on ``calib_images`` and return the quantized model.

    Args:
        model: a float timm model (``VisionTransformer``, distilled DeiT or ``SwinTransformer``).
        calib_images: float tensor ``(N, 3, H, W)``, already transformed like eval images.
        preset: a named recipe (``"ptq4vit"``, ``"rotq"``, ... : ``ptq4vit.RECIPES``) or a :class:`Recipe`
            (a flat :class:`Preset` is read as the recipe it means).
        w_bits, a_bits: weight and activation bits, 2..8 each.
        memory_budget: bytes calibration may hold at once beyond the model and the images:
            captured activations and gradients, the capture pass's autograd graph, and the
            search's copies and temporaries (default: a quarter of the memory free for this
            process on the calibration device; on CPU the container's cgroup limit counts).
            A budget too small for one site raises UserError.
        capture_batch: images per forward/backward pass while capturing (fewer if the
            budget needs it).
        threads: CPU threads for calibration: the capture passes run on this many intra-op
            threads, the search on this many sites side by side, one intra-op thread each
            (default: torch's thread count capped by the CPUs this process may use, i.e. its
            affinity and cgroup CPU quota). Torch's setting is restored afterwards. The scales
            do not depend on the number of search workers (tests/test_budget.py).
        progress: show a progress bar over the sites.
        inplace: quantize ``model`` itself instead of a copy.
        adapters: the model families known, by model class (default: timm's ViT/DeiT and Swin);
            ``DEFAULT_ADAPTERS.with_adapter(...)`` adds one for another model (docs/models.md).
        reconstruction_images: with a recipe whose ``reconstruction`` is ``learned``, the images it
            learns on (the first ``reconstruction.images`` of them; default: ``calib_images``); its
            report is ``qmodel.reconstruction_report`` (docs/lowbit.md §11).
        **overrides: recipe paths to change, e.g. ``**{"calibration.alpha": 0.3}``, ``softmax="log"``,
            or flat preset fields, e.g. ``metric="cosine"`` (see :func:`get_recipe`).

    A ``calibration="percentile"`` preset (``repq-vit``, docs/lowbit.md §6) runs all of
    ``calib_images`` through the model in one batch, as RepQ-ViT does; ``memory_budget``,
    ``capture_batch`` and ``threads`` apply to the search presets only.

    Calibration runs on the device of the model's parameters, with images in the model's
    floating dtype (float32, bfloat16 or float16; the scale search itself runs in float32);
    it is deterministic, so the same inputs give bit-identical scales. Scales are float32 and
    live on the model's device.
    """
    check_arguments(quantize, dict(model=model, calib_images=calib_images, preset=preset, w_bits=w_bits,
                                   a_bits=a_bits, memory_budget=memory_budget, capture_batch=capture_batch,
                                   progress=progress, inplace=inplace, threads=threads, adapters=adapters,
                                   reconstruction_images=reconstruction_images))
    recipe = get_recipe(preset, **overrides)
    check_bits(w_bits, "w_bits")
    check_bits(a_bits, "a_bits")
    if memory_budget is not None and memory_budget < 1:
        raise UserError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
    if capture_batch < 1:
        raise UserError(f"capture_batch must be a positive integer, got {capture_batch}")
    if threads is not None and threads < 1:
        raise UserError(f"threads must be a positive integer, got {threads}")
    _check_images(model, calib_images, adapters)
    learned = recipe.reconstruction.variant != "none"
    if reconstruction_images is not None:
        if not learned:
            raise UserError("reconstruction_images are given but the recipe's reconstruction is none "
                            "(set reconstruction='learned' to use them)")
        _check_images(model, reconstruction_images, adapters, "reconstruction_images")
    model_dtype = _device_and_dtype(model)[1]
    if learned and model_dtype != torch.float32:
        raise UserError(f"reconstruction learns in float32: the model's parameters are {model_dtype}; "
                        f"quantize a float32 copy (model.float()) or set reconstruction='none'")

    if learned and recipe.reconstruction.last_unit == "features":
        adapters.adapter_for(model).head_features(model)  # refuses, before calibrating, a family that cannot say
    name = adapters.adapter_for(model).model_name(model)
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    device, dtype = _device_and_dtype(model)
    # Images take the model's dtype: a bf16 model gets bf16 images (its convs refuse float32 input).
    images = calib_images.to(device=device, dtype=dtype)
    float_digest = float_weights_digest(model)  # before rotation, smoothing or rounding rewrite weights
    sites = prepare_sites(model, recipe, w_bits, a_bits, adapters=adapters)
    qmodel = QuantizedModel(model, recipe, w_bits, a_bits, name)
    qmodel.float_weights_sha256 = float_digest
    if learned:  # the blocks reconstruction replays, refused now rather than after calibrating
        with qmodel.quantization_disabled():
            bind_block_arguments(model, reconstruction_units(model, recipe.reconstruction.unit, adapters),
                                 images[:1])

    desc = f"calibrating {recipe.name} W{w_bits}A{a_bits}"
    if recipe.calibration.variant == "percentile":  # RepQ-ViT (docs/lowbit.md §6): one pass over every image
        reparam = recipe.transform("ln_reparam")
        pairs = norm_linear_pairs(model, adapters=adapters) if reparam is not None else []
        with qmodel.quantization_disabled():
            calibrate_percentile(model, images, sites, pairs, progress=progress, desc=desc,
                                 round_zero_point=reparam is not None and reparam.round_zero_point,
                                 fold_dtype=torch.float64 if reparam is not None and reparam.fold_float64 else None)
    else:
        budget = memory_budget if memory_budget is not None else default_memory_budget(device)
        with qmodel.quantization_disabled():
            plan = calibrate_model(model, images, sites, recipe, budget, capture_batch,
                                   threads=threads, progress=progress, desc=desc)
        logger.debug("%s: %d sites, %d capture pass(es) within a budget of %.1f MiB", name, len(sites),
                     len(plan.groups), budget / 2 ** 20)
    _check_scales(model)
    if learned:
        qmodel.reconstruction_report = reconstruct(
            qmodel, images if reconstruction_images is None else reconstruction_images, recipe.reconstruction,
            progress=progress, threads=threads, memory_budget=memory_budget, adapters=adapters)
        _check_scales(model)
    return qmodel


def _check_images(model: nn.Module, calib_images: torch.Tensor, adapters: AdapterRegistry,
                  what: str = "calib_images") -> None:
    """Refuse images the model cannot be calibrated on, before anything runs (a NaN would reach every scale)."""
    if calib_images.dim() != 4 or calib_images.shape[1] != 3:
        raise UserError(f"{what} must be a float tensor of shape (N, 3, H, W), got {tuple(calib_images.shape)}")
    if not calib_images.is_floating_point() or len(calib_images) == 0:
        raise UserError(f"{what} must be a non-empty float tensor, got {len(calib_images)} images of "
                        f"{calib_images.dtype}")
    bad = nonfinite_count(calib_images)
    if bad:
        raise UserError(f"{what} hold {bad} of {calib_images.numel()} values that are not finite (NaN or inf)")
    check_image_size(model, calib_images.shape[2], calib_images.shape[3], what, adapters=adapters)
    for name, p in model.named_parameters():
        bad = nonfinite_count(p.detach()) if p.is_floating_point() else 0
        if bad:
            raise UserError(f"the float model's parameter {name} has {bad} of {p.numel()} values that are not "
                            f"finite (NaN or inf)")


def _check_scales(model: nn.Module) -> None:
    """Calibration must leave every scale finite and positive; say where it did not, and why it can happen."""
    bad = bad_scales(model)
    if bad:
        where, value = bad[0]
        raise UserError(f"calibration gave {len(bad)} quantizer buffer(s) that are not finite and positive, first "
                        f"{where} ({value}): the float model's activations on these calibration images are "
                        f"probably out of float range; check the images' range and the model's weights")


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's parameters (its first floating parameter)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    raise UserError(f"model {type(model).__name__} has no floating-point parameters to quantize")

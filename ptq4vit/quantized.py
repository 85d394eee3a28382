"""QuantizedModel: a timm model whose quantization sites carry calibrated quantizers."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Optional, Iterator, Union

import torch
from torch import nn

from .atomic_write import atomic_write_text
from .nn import QUANT_MODULES
from .quant import Quantizer, floats
from .recipes import Recipe, from_flat
from .recipes.flat import Preset
from .typecheck import checked


def model_name(model: nn.Module) -> str:
    """``architecture.tag`` from timm's pretrained config (``architecture`` alone when untagged)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") or type(model).__name__
    tag = cfg.get("tag")
    return f"{arch}.{tag}" if tag else arch


class QuantizedModel(nn.Module):
    """The quantized model: call it like the float one; ``qparams()`` reports its scales.

    ``model`` is the timm model with its quantized layers in place, so module names (and the
    keys of :meth:`qparams`) are timm's.
    """

    def __init__(self, model: nn.Module, recipe: "Recipe | Preset", w_bits: int, a_bits: int, name: str):
        super().__init__()
        self.model = model
        #: How it was quantized (the source of truth; checkpoints store it).
        self.recipe: Recipe = recipe if isinstance(recipe, Recipe) else from_flat(recipe)
        #: The recipe's resolved flat view, as the engine read it.
        self.preset: Preset = self.recipe.flat()
        self.w_bits = w_bits
        self.a_bits = a_bits
        self.name = name
        #: Digest of the float weights it was calibrated from (``ptq4vit.checkpoint.float_weights_digest``),
        #: taken before calibration; None when unknown. Rotations, smoothing and second-order
        #: rounding rewrite the weights, so it cannot be recomputed from this model.
        self.float_weights_sha256: Optional[str] = None
        #: What reconstruction did (``ptq4vit.ReconstructionReport``) when ``quantize`` ran it; None
        #: otherwise, and for a loaded checkpoint (its recipe still says how it was reconstructed).
        self.reconstruction_report = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def sites(self) -> dict[str, nn.Module]:
        """Quantization sites by timm module name, in model order."""
        return {n: m for n, m in self.model.named_modules() if isinstance(m, QUANT_MODULES)}

    def quantizers(self) -> Iterator[Quantizer]:
        return (m for m in self.model.modules() if isinstance(m, Quantizer))

    def set_quantization(self, enabled: bool) -> None:
        for q in self.quantizers():
            q.enabled = enabled

    @contextmanager
    def quantization_disabled(self) -> Iterator["QuantizedModel"]:
        """Temporarily run the float model (all quantizers off)."""
        previous = [(q, q.enabled) for q in self.quantizers()]
        self.set_quantization(False)
        try:
            yield self
        finally:
            for q, enabled in previous:
                q.enabled = enabled

    def qparams(self) -> dict:
        """The chosen parameters in the JSON layout of docs/method.md §8."""
        modules = {}
        for name, site in self.sites().items():
            entry = {"kind": site.kind}
            for role, q in site.quantizers().items():
                entry.update(q.qparams(role[0]))          # w_quant -> "w_scale", ...
                if role == "w_quant" and getattr(site, "smooth", None) is not None:
                    entry["smooth"] = floats(site.smooth)
            modules[name] = entry
        return {"model": self.name, "preset": self.preset.name, "w_bits": self.w_bits, "a_bits": self.a_bits,
                "overrides": self.preset.overrides(), "modules": modules}


@checked
def write_qparams_json(qmodel: QuantizedModel, path: Union[str, os.PathLike]) -> None:
    """Write ``qmodel.qparams()`` (every chosen scale, docs/method.md §8) as a JSON report.

    This is a human- and tool-readable report of the calibration, not a checkpoint: to save a
    model that loads back, use :func:`ptq4vit.save`.
    """
    atomic_write_text(path, json.dumps(qmodel.qparams(), indent=1) + "\n", what="qparams JSON")

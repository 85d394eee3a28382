"""Which adapter quantizes which model class, and the entry point :func:`insert_quant_sites`.

Adapters are looked up by the model's exact class (a subclass may compute something else, so
it is never assumed to share its parent's layout). A registry is immutable: build another one
with :meth:`AdapterRegistry.with_adapter` to add a family, and pass it to ``insert_quant_sites``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

from torch import nn

from ..errors import UnsupportedModelError
from ..nn import QUANT_MODULES
from ..recipes import Recipe, get_recipe
from ..recipes.flat import Preset
from .adapter import Adapter
from .hf_vit import DEIT, DINOV2, VIT, HFVitAdapter
from .hf_clip import HFClipAdapter
from .hf_siglip import HFSiglipAdapter
from .sites import SiteBuilder
from .beit import BeitAdapter
from .eva import EvaAdapter
from .swin import SwinAdapter
from .torchvision_vit import TorchvisionVitAdapter
from .torchvision_swin import TorchvisionSwinAdapter
from .hf_swin import HFSwinAdapter
from .swin_v2 import SwinV2Adapter
from .vit import VitAdapter


class AdapterRegistry:
    """Adapters by the exact model classes they handle."""

    def __init__(self, adapters: Iterable[Adapter]):
        self.adapters: tuple[Adapter, ...] = tuple(adapters)
        self._by_class: dict[type, Adapter] = {}
        self._by_class_name: dict[str, Adapter] = {}
        for adapter in self.adapters:
            for cls in adapter.model_classes:
                if cls in self._by_class:
                    raise ValueError(f"two adapters claim {cls.__name__}: {self._by_class[cls].family} and {adapter.family}")
                self._by_class[cls] = adapter
            for qualname in adapter.model_class_names:
                if qualname in self._by_class_name:
                    raise ValueError(f"two adapters claim {qualname}: {self._by_class_name[qualname].family} and "
                                     f"{adapter.family}")
                self._by_class_name[qualname] = adapter
        names: dict[str, Adapter] = {}
        for adapter in self.adapters:
            for name in adapter.architectures:
                if name in names:
                    raise ValueError(f"two adapters build the model name {name!r}: {names[name].family} and {adapter.family}")
                names[name] = adapter

    @property
    def model_classes(self) -> tuple[type, ...]:
        return tuple(self._by_class)

    def with_adapter(self, adapter: Adapter) -> "AdapterRegistry":
        """A new registry with ``adapter`` added."""
        return AdapterRegistry((*self.adapters, adapter))

    def adapter_for_name(self, name: str) -> Adapter:
        """The adapter of the model name ``name`` (``architecture`` or ``architecture.tag``), found without
        building anything: an adapter that names the architecture in its ``architectures``, else the
        one of the timm module that registers it (a tag must be one timm knows)."""
        import timm.models

        arch, _, tag = name.partition(".")
        for adapter in self.adapters:
            if arch in adapter.architectures:
                return adapter
        if not timm.models.is_model(arch):
            raise UnsupportedModelError(f"{name!r} is not a model name timm {timm.__version__} knows")
        module = timm.models.model_entrypoint(arch).__module__
        for adapter in self.adapters:
            if module in adapter.timm_modules:
                if tag:
                    try:
                        timm.models.get_pretrained_cfg(name, allow_unregistered=False)
                    except RuntimeError:
                        raise UnsupportedModelError(f"timm knows no tag {tag!r} of {arch}") from None
                return adapter
        raise UnsupportedModelError(
            f"timm model {name!r} (from {module}) has no ptq4vit adapter; ptq4vit has adapters for the models of "
            f"{', '.join(m for a in self.adapters for m in a.timm_modules)}")

    def adapter_for(self, model: nn.Module) -> Adapter:
        cls = type(model)
        adapter = self._by_class.get(cls) or self._by_class_name.get(f"{cls.__module__}.{cls.__qualname__}")
        if adapter is None:
            named = (cls, *self._by_class)
            known = [_type_name(c, named) for c in self._by_class] + [n.rpartition(".")[2] for n in self._by_class_name]
            raise UnsupportedModelError(
                f"model type {_type_name(cls, named)} is not supported; the adapter registry has adapters "
                f"for {', '.join(known)}")
        return adapter


def _type_name(cls: type, named: tuple[type, ...]) -> str:
    """The class name, with its module where another class of ``named`` has that name too (timm's and
    torchvision's ``VisionTransformer``, ``SwinTransformer``)."""
    clash = any(c.__name__ == cls.__name__ and c is not cls for c in named)
    return f"{cls.__module__}.{cls.__qualname__}" if clash else cls.__name__


#: The adapters ptq4vit ships, one per model family (docs/models.md).
DEFAULT_ADAPTERS = AdapterRegistry((
    VitAdapter(),
    SwinAdapter(),
    BeitAdapter(),
    SwinV2Adapter(),
    EvaAdapter(),
    TorchvisionVitAdapter(),
    # Hugging Face transformers' ViT, DeiT and DINOv2, named by class path: transformers stays optional
    HFVitAdapter(VIT),
    HFVitAdapter(DEIT),
    HFVitAdapter(DINOV2),
    TorchvisionSwinAdapter(),
    HFSwinAdapter(),
    HFClipAdapter(),
    HFSiglipAdapter(),
))


def insert_quant_sites(model: nn.Module, recipe: "Recipe | Preset | str", w_bits: int, a_bits: int, *,
                       adapters: AdapterRegistry = DEFAULT_ADAPTERS) -> "OrderedDict[str, nn.Module]":
    """Replace the quantized layers of a supported timm model in place; return ``{name: site}`` in model order.
    ``recipe``: a :class:`Recipe`, a named one, or a flat :class:`Preset` (read as the recipe it means).

    Sites are :class:`QuantLinear`, :class:`QuantConv2d` and :class:`QuantMatMul` modules; the
    attention matmuls are named ``<attention module>.matmul1`` and ``.matmul2``. Quantizers are
    created on the device of the layer they quantize. A model with any module its adapter does
    not know is refused with :class:`UnsupportedModelError` naming the module, and left unchanged.
    """
    build = SiteBuilder(get_recipe(recipe), w_bits, a_bits)
    plan = adapters.adapter_for(model).plan(model, build)
    plan.check_complete(model)
    plan.apply(model)
    return OrderedDict((name, m) for name, m in model.named_modules() if isinstance(m, QUANT_MODULES))


def norm_linear_pairs(model: nn.Module, *, adapters: AdapterRegistry = DEFAULT_ADAPTERS) -> list[tuple[str, str]]:
    """The ``(LayerNorm, linear)`` paths of ``model`` that ``reparam_ln`` folds (docs/lowbit.md §6);
    UnsupportedModelError, naming the family or the module, where it does not apply."""
    return adapters.adapter_for(model).norm_linear_pairs(model)


def check_image_size(model: nn.Module, height: int, width: int, what: str = "images", *,
                     adapters: AdapterRegistry = DEFAULT_ADAPTERS) -> None:
    """UserError naming both sizes unless ``model`` takes ``height x width`` images (its family's rule)."""
    adapters.adapter_for(model).check_image_size(model, height, width, what)

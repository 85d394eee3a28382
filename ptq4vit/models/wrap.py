"""Put quantization sites into a timm ViT, DeiT or Swin (the only timm-specific part).

:func:`insert_quant_sites` replaces, in place, every layer that docs/method.md §1 quantizes with its
quantized counterpart and returns the sites by timm module name, in model order. Anything it
does not understand (another attention design, a stray linear or conv) is refused with an
error naming the module, rather than being left silently in float.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn
from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import SwinTransformer, WindowAttention
from timm.models.vision_transformer import VisionTransformer

from ..nn import QuantConv2d, QuantLinear, QuantMatMul
from ..errors import UnsupportedModelError
from ..presets import Preset
from ..quant import Quantizer, TwinGeluQuantizer, TwinSoftmaxQuantizer, UniformQuantizer, check_bits
from .attention import QuantAttention, QuantWindowAttention

SUPPORTED_MODELS = (VisionTransformer, VisionTransformerDistilled, SwinTransformer)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


class _SiteBuilder:
    """Creates quantized layers with the quantizers a preset asks for."""

    def __init__(self, preset: Preset, w_bits: int, a_bits: int):
        self.preset = preset
        self.w_bits = check_bits(w_bits, "w_bits")
        self.a_bits = check_bits(a_bits, "a_bits")

    def activation(self) -> UniformQuantizer:
        return UniformQuantizer(self.a_bits)

    def linear(self, linear: nn.Linear, w_groups: int = 1, a_quant: Quantizer | None = None) -> QuantLinear:
        w_quant = UniformQuantizer(self.w_bits, w_groups, axis=0 if w_groups > 1 else None)
        return QuantLinear(linear, w_quant, a_quant if a_quant is not None else self.activation())

    def post_gelu_linear(self, linear: nn.Linear) -> QuantLinear:
        if self.preset.gelu_twin:
            return self.linear(linear, a_quant=TwinGeluQuantizer(self.a_bits, pow2=self.preset.gelu_pow2))
        return self.linear(linear)

    def patch_conv(self, conv: nn.Conv2d) -> QuantConv2d:
        if self.preset.conv_per_channel:
            return QuantConv2d(conv, UniformQuantizer(self.w_bits, conv.out_channels, axis=0))
        return QuantConv2d(conv, UniformQuantizer(self.w_bits))

    def attention_matmuls(self, num_heads: int) -> tuple[QuantMatMul, QuantMatMul]:
        def per_head() -> UniformQuantizer:
            return UniformQuantizer(self.a_bits, num_heads, axis=1)

        matmul1 = QuantMatMul(per_head(), per_head())
        if self.preset.softmax_twin:
            softmax_quant = TwinSoftmaxQuantizer(self.a_bits, self.preset.softmax_twin_form)
        else:
            softmax_quant = per_head()
        return matmul1, QuantMatMul(softmax_quant, per_head())


def _quant_attention(attn: nn.Module, build: _SiteBuilder, name: str) -> nn.Module:
    if type(attn) is Attention:
        if getattr(attn, "gate", None) is not None:
            raise UnsupportedModelError(f"module {name!r}: gated attention is not supported")
        cls = QuantAttention
    else:
        cls = QuantWindowAttention
    matmul1, matmul2 = build.attention_matmuls(attn.num_heads)
    return cls(attn, build.linear(attn.qkv, w_groups=3), build.linear(attn.proj), matmul1, matmul2)


def insert_quant_sites(model: nn.Module, preset: Preset, w_bits: int, a_bits: int) -> "OrderedDict[str, nn.Module]":
    """Replace the quantized layers of a timm ViT/DeiT/Swin in place; return ``{name: site}`` in model order.

    Sites are :class:`QuantLinear`, :class:`QuantConv2d` and :class:`QuantMatMul` modules; the
    attention matmuls are named ``<attention module>.matmul1`` and ``.matmul2``.
    """
    if type(model) not in SUPPORTED_MODELS:
        raise UnsupportedModelError(
            f"model type {type(model).__name__} is not supported; ptq4vit handles timm "
            f"{', '.join(c.__name__ for c in SUPPORTED_MODELS)}")
    build = _SiteBuilder(preset, w_bits, a_bits)
    replaced: set[str] = set()

    for name, module in list(model.named_modules()):
        if any(name.startswith(r + ".") for r in replaced):
            continue
        if type(module) in (Attention, WindowAttention):
            _set_submodule(model, name, _quant_attention(module, build, name))
            replaced.add(name)
        elif type(module) is Mlp:
            if not isinstance(module.act, nn.GELU) and build.preset.gelu_twin:
                raise UnsupportedModelError(f"module {name!r}: the GELU twin quantizer needs nn.GELU, found {type(module.act).__name__}")
            module.fc1 = build.linear(module.fc1)
            module.fc2 = build.post_gelu_linear(module.fc2)
            replaced.add(name)
        elif name.endswith("patch_embed.proj") and type(module) is nn.Conv2d:
            _set_submodule(model, name, build.patch_conv(module))
        elif type(module) is nn.Linear:
            _set_submodule(model, name, build.linear(module))

    for name, module in model.named_modules():
        if type(module) in (nn.Linear, nn.Conv2d) or (
                "attention" in type(module).__name__.lower() and not isinstance(module, (QuantAttention, QuantWindowAttention))):
            raise UnsupportedModelError(
                f"module {name!r} of type {type(module).__name__} has no quantization adapter")

    return OrderedDict((name, m) for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d, QuantMatMul)))

"""Build the quantized layers a recipe asks for (the family-independent half of an adapter).

Every quantizer is created on the device of the float layer it replaces, so a model that lives
on CUDA (or on ``meta``) gets its scales there, in float32.
"""
from __future__ import annotations

from torch import nn

from typing import Callable, Optional

from ..nn import FloatMatMul, QuantConv2d, QuantLinear, QuantMatMul
from ..quant import (AsymmetricQuantizer, GeluLogQuantizer, LogQuantizer, Quantizer, TwinGeluQuantizer,
                     TwinSoftmaxQuantizer, UniformQuantizer, check_bits)
from ..recipes import Recipe

#: fc2's post-GELU input quantizer of each ``recipe.gelu`` variant, from (the component, bits, device);
#: None: the linear inputs' quantizer (and their smoothing and asymmetry).
POST_GELU_QUANTIZERS: dict[str, Callable[..., Optional[Quantizer]]] = {
    "uniform": lambda gelu, bits, device: None,
    "twin": lambda gelu, bits, device: TwinGeluQuantizer(bits, pow2=gelu.pow2, device=device),
    "log": lambda gelu, bits, device: GeluLogQuantizer(bits, gelu.base, device=device),
}


class SiteBuilder:
    """Creates quantized layers with the quantizers of ``recipe`` at ``w_bits``/``a_bits``."""

    def __init__(self, recipe: Recipe, w_bits: int, a_bits: int):
        self.recipe = recipe
        self.w_bits = check_bits(w_bits, "w_bits")
        self.a_bits = check_bits(a_bits, "a_bits")
        #: RepQ-ViT's quantizers: asymmetric everywhere, weights per output channel (docs/lowbit.md §6).
        self.zero_point = recipe.calibration.variant == "percentile"

    @property
    def post_gelu_quantizer(self) -> bool:
        """Whether fc2's input gets a quantizer of its own that needs the exact GELU before it (twin, log)."""
        return self.recipe.gelu.variant != "uniform"

    def activation(self, bits: int, device) -> Quantizer:
        """A per-tensor activation quantizer of the recipe's kind."""
        return AsymmetricQuantizer(bits, device=device) if self.zero_point else UniformQuantizer(bits, device=device)

    def linear(self, linear: nn.Linear, w_groups: int = 1, a_quant: Quantizer | None = None,
               bits: tuple[int, int] | None = None, smooth: bool = False, asymmetric: bool = False) -> QuantLinear:
        """A linear layer; ``w_groups`` contiguous blocks of output rows get a scale each, or every output
        row its own with ``weights.granularity="channel"`` (a refinement of the q/k/v blocks, docs/lowbit.md §3).
        ``bits``: (weight, input) bits, default the run's. ``smooth``: a per-input-channel smoothing
        divisor, calibrated when the recipe has the smoothing transform. ``asymmetric``: a zero-point input
        quantizer when the recipe has ``inputs="asymmetric"``."""
        device = linear.weight.device
        w_bits, a_bits = bits or (self.w_bits, self.a_bits)
        if a_quant is None and asymmetric and self.recipe.inputs == "asymmetric":
            a_quant = AsymmetricQuantizer(a_bits, device=device)
        if a_quant is None:
            a_quant = self.activation(a_bits, device)
        if self.zero_point:
            w_quant: Quantizer = AsymmetricQuantizer(w_bits, linear.out_features, axis=0, device=device)
            return QuantLinear(linear, w_quant, a_quant)
        if self.recipe.weights.granularity == "channel":
            w_groups = linear.out_features
        w_quant = UniformQuantizer(w_bits, w_groups, axis=0 if w_groups > 1 else None, device=device)
        return QuantLinear(linear, w_quant, a_quant, smooth=smooth and self.recipe.transform("smoothing") is not None)

    def classifier(self, linear: nn.Linear) -> QuantLinear:
        """The classifier head: a linear layer at ``recipe.head_bits`` if set (docs/lowbit.md §7)."""
        head_bits = self.recipe.head_bits
        bits = (head_bits, head_bits) if head_bits else None
        return self.linear(linear, bits=bits, asymmetric=True)

    def qkv_linear(self, linear: nn.Linear) -> QuantLinear:
        """A fused q/k/v projection: one weight scale per q, k and v block (docs/method.md §1); its
        input is a norm's output, smoothed if the recipe says so."""
        return self.linear(linear, w_groups=3, smooth=True, asymmetric=True)

    def normed_linear(self, linear: nn.Linear) -> QuantLinear:
        """A linear layer whose input is a norm's output (fc1): smoothed if the recipe says so, since a
        runtime folds the per-channel division into the norm (docs/deployment.md)."""
        return self.linear(linear, smooth=True, asymmetric=True)

    def post_gelu_linear(self, linear: nn.Linear) -> QuantLinear:
        """fc2 of an MLP: its input is the GELU output (the post-GELU twin, docs/method.md §4, or the
        post-GELU log quantizer, docs/lowbit.md §8; neither is smoothed: the input must stay GELU's)."""
        gelu = self.recipe.gelu
        own = POST_GELU_QUANTIZERS[gelu.variant](gelu, self.a_bits, linear.weight.device)
        if own is not None:
            return self.linear(linear, a_quant=own)
        return self.linear(linear, smooth=True, asymmetric=True)  # the division folds into fc1's output (and GELU) at run time

    def patch_conv(self, conv: nn.Conv2d) -> QuantConv2d:
        """The patch embedding: its weight, per channel if the recipe says so; its image input only with
        ``patch_input_bits`` (RepQ-ViT quantizes it at 8 bits)."""
        device = conv.weight.device
        if self.zero_point:
            bits = self.recipe.patch_input_bits
            a_quant = self.activation(bits, device) if bits else None
            return QuantConv2d(conv, AsymmetricQuantizer(self.w_bits, conv.out_channels, axis=0, device=device), a_quant)
        if self.recipe.weights.conv_per_channel:
            return QuantConv2d(conv, UniformQuantizer(self.w_bits, conv.out_channels, axis=0, device=device))
        return QuantConv2d(conv, UniformQuantizer(self.w_bits, device=device))

    def attention_matmuls(self, num_heads: int, like: nn.Linear) -> tuple[nn.Module, nn.Module]:
        """``q @ kᵀ`` and ``softmax @ v``, per-head operands, on the device of ``like`` (the qkv layer);
        two :class:`FloatMatMul` when the recipe keeps attention float."""
        softmax = self.recipe.softmax
        if softmax.variant == "float":
            return FloatMatMul(), FloatMatMul()
        device = like.weight.device

        def per_head() -> Quantizer:
            if self.zero_point:  # RepQ-ViT: one range per operand
                return self.activation(self.a_bits, device)
            return UniformQuantizer(self.a_bits, num_heads, axis=1, device=device)

        matmul1 = QuantMatMul(per_head(), per_head())
        softmax_quant = {  # the post-softmax operand's quantizer, by the recipe's softmax variant
            # the log quantizer's largest level is calibrated under percentile calibration (RepQ-ViT's)
            "log": lambda: LogQuantizer(self.a_bits, softmax.base, scaled=self.zero_point, device=device),
            "twin": lambda: TwinSoftmaxQuantizer(self.a_bits, softmax.form, top=softmax.top, device=device),
            "uniform": per_head,
        }[softmax.variant]()
        return matmul1, QuantMatMul(softmax_quant, per_head(), renorm_rows=softmax.renorm)

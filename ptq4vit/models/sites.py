"""Build the quantized layers a preset asks for (the family-independent half of an adapter).

Every quantizer is created on the device of the float layer it replaces, so a model that lives
on CUDA (or on ``meta``) gets its scales there, in float32.
"""
from __future__ import annotations

from torch import nn

from ..nn import FloatMatMul, QuantConv2d, QuantLinear, QuantMatMul
from ..presets import Preset
from ..quant import (AsymmetricQuantizer, GeluLogQuantizer, LogQuantizer, Quantizer, TwinGeluQuantizer,
                     TwinSoftmaxQuantizer, UniformQuantizer, check_bits)


class SiteBuilder:
    """Creates quantized layers with the quantizers of ``preset`` at ``w_bits``/``a_bits``."""

    def __init__(self, preset: Preset, w_bits: int, a_bits: int):
        self.preset = preset
        self.w_bits = check_bits(w_bits, "w_bits")
        self.a_bits = check_bits(a_bits, "a_bits")
        #: RepQ-ViT's quantizers: asymmetric everywhere, weights per output channel (docs/lowbit.md §6).
        self.zero_point = preset.calibration == "percentile"

    def activation(self, bits: int, device) -> Quantizer:
        """A per-tensor activation quantizer of the preset's kind."""
        return AsymmetricQuantizer(bits, device=device) if self.zero_point else UniformQuantizer(bits, device=device)

    def linear(self, linear: nn.Linear, w_groups: int = 1, a_quant: Quantizer | None = None,
               bits: tuple[int, int] | None = None, smooth: bool = False, asymmetric: bool = False) -> QuantLinear:
        """A linear layer; ``w_groups`` contiguous blocks of output rows get a scale each, or every output
        row its own with ``w_granularity="channel"`` (a refinement of the q/k/v blocks, docs/lowbit.md §3).
        ``bits``: (weight, input) bits, default the run's. ``smooth``: a per-input-channel smoothing
        divisor, calibrated when the preset has ``smooth_alpha``. ``asymmetric``: a zero-point input
        quantizer when the preset has ``asymmetric_inputs``."""
        device = linear.weight.device
        w_bits, a_bits = bits or (self.w_bits, self.a_bits)
        if a_quant is None and asymmetric and self.preset.asymmetric_inputs:
            a_quant = AsymmetricQuantizer(a_bits, device=device)
        if a_quant is None:
            a_quant = self.activation(a_bits, device)
        if self.zero_point:
            w_quant: Quantizer = AsymmetricQuantizer(w_bits, linear.out_features, axis=0, device=device)
            return QuantLinear(linear, w_quant, a_quant)
        if self.preset.w_granularity == "channel":
            w_groups = linear.out_features
        w_quant = UniformQuantizer(w_bits, w_groups, axis=0 if w_groups > 1 else None, device=device)
        return QuantLinear(linear, w_quant, a_quant, smooth=smooth and self.preset.smooth_alpha > 0)

    def classifier(self, linear: nn.Linear) -> QuantLinear:
        """The classifier head: a linear layer at ``preset.head_bits`` if set (docs/lowbit.md §7)."""
        bits = (self.preset.head_bits, self.preset.head_bits) if self.preset.head_bits else None
        return self.linear(linear, bits=bits, asymmetric=True)

    def qkv_linear(self, linear: nn.Linear) -> QuantLinear:
        """A fused q/k/v projection: one weight scale per q, k and v block (docs/method.md §1); its
        input is a norm's output, smoothed if the preset says so."""
        return self.linear(linear, w_groups=3, smooth=True, asymmetric=True)

    def normed_linear(self, linear: nn.Linear) -> QuantLinear:
        """A linear layer whose input is a norm's output (fc1): smoothed if the preset says so, since a
        runtime folds the per-channel division into the norm (docs/deployment.md)."""
        return self.linear(linear, smooth=True, asymmetric=True)

    def post_gelu_linear(self, linear: nn.Linear) -> QuantLinear:
        """fc2 of an MLP: its input is the GELU output (the post-GELU twin, docs/method.md §4, or the
        post-GELU log quantizer, docs/lowbit.md §8; neither is smoothed: the input must stay GELU's)."""
        if self.preset.gelu_log != "none":
            log = GeluLogQuantizer(self.a_bits, self.preset.gelu_log, device=linear.weight.device)
            return self.linear(linear, a_quant=log)
        if self.preset.gelu_twin:
            twin = TwinGeluQuantizer(self.a_bits, pow2=self.preset.gelu_pow2, device=linear.weight.device)
            return self.linear(linear, a_quant=twin)
        return self.linear(linear, smooth=True, asymmetric=True)  # the division folds into fc1's output (and GELU) at run time

    def patch_conv(self, conv: nn.Conv2d) -> QuantConv2d:
        """The patch embedding: its weight, per channel if the preset says so; its image input only with
        ``patch_input_bits`` (RepQ-ViT quantizes it at 8 bits)."""
        device = conv.weight.device
        if self.zero_point:
            a_quant = self.activation(self.preset.patch_input_bits, device) if self.preset.patch_input_bits else None
            return QuantConv2d(conv, AsymmetricQuantizer(self.w_bits, conv.out_channels, axis=0, device=device), a_quant)
        if self.preset.conv_per_channel:
            return QuantConv2d(conv, UniformQuantizer(self.w_bits, conv.out_channels, axis=0, device=device))
        return QuantConv2d(conv, UniformQuantizer(self.w_bits, device=device))

    def attention_matmuls(self, num_heads: int, like: nn.Linear) -> tuple[nn.Module, nn.Module]:
        """``q @ kᵀ`` and ``softmax @ v``, per-head operands, on the device of ``like`` (the qkv layer);
        two :class:`FloatMatMul` when the preset keeps attention float."""
        if not self.preset.quantize_attention:
            return FloatMatMul(), FloatMatMul()
        device = like.weight.device

        def per_head() -> Quantizer:
            if self.zero_point:  # RepQ-ViT: one range per operand
                return self.activation(self.a_bits, device)
            return UniformQuantizer(self.a_bits, num_heads, axis=1, device=device)

        matmul1 = QuantMatMul(per_head(), per_head())
        if self.preset.softmax_log != "none":  # the log quantizer replaces uniform and twin alike
            softmax_quant: Quantizer = LogQuantizer(self.a_bits, self.preset.softmax_log,
                                                    scaled=self.preset.softmax_log_scale, device=device)
        elif self.preset.softmax_twin:
            softmax_quant = TwinSoftmaxQuantizer(self.a_bits, self.preset.softmax_twin_form, device=device)
        else:
            softmax_quant = per_head()
        return matmul1, QuantMatMul(softmax_quant, per_head(), renorm_rows=self.preset.softmax_renorm)

"""Quantized layers: a float layer plus the quantizers of its weight and input.

Only inputs and weights are quantized (docs/method.md §1): outputs, biases and everything between
layers stay float. Each module keeps the original float parameters, so switching its
quantizers off gives back the float layer exactly.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import Quantizer, renormalize_rows


class QuantSite(nn.Module):
    """Base of the quantization sites: ``kind`` names the site in reports, ``ROLES`` its quantizer
    attributes in order (``w_quant``: the weight; ``a_quant``/``b_quant``: the inputs)."""

    kind: ClassVar[str]
    ROLES: ClassVar[tuple[str, ...]]

    def quantizers(self) -> dict[str, Quantizer]:
        """The site's quantizers by role, in ``ROLES`` order (an absent one, such as a float conv input, left out)."""
        return {role: q for role in self.ROLES if (q := getattr(self, role)) is not None}


class QuantLinear(QuantSite):
    """``nn.Linear`` with a (grouped) weight quantizer and an optional input quantizer.

    With ``smooth=True`` the layer has a per-input-channel divisor ``smooth`` (ones until
    calibration sets it, docs/deployment.md): it computes ``q(x / s) · q(W diag(s))ᵀ``, the stored
    weight being ``W diag(s)``, which moves an activation channel's outliers into the weight's
    per-channel scales (SmoothQuant). The float function is unchanged up to rounding.
    """

    kind = "linear"
    ROLES = ("w_quant", "a_quant")
    #: ``smooth`` divides the input: finite and positive (ptq4vit.finite).
    positive_buffers: tuple[str, ...] = ("smooth",)

    def __init__(self, linear: nn.Linear, w_quant: Quantizer, a_quant: Optional[Quantizer], smooth: bool = False):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.w_quant = w_quant
        self.a_quant = a_quant
        self.smooth: Optional[torch.Tensor]
        self.register_buffer("smooth", torch.ones(linear.in_features, dtype=linear.weight.dtype,
                                                  device=linear.weight.device) if smooth else None)
        #: Where learned rounding starts (docs/lowbit.md §11): GPTQ's weight before its last rounding,
        #: set by calibration only when the recipe reconstructs with learned rounding and dropped by
        #: reconstruction. A plain attribute, not a buffer: never saved, never part of the forward.
        self.rounding_start: Optional[torch.Tensor] = None
        #: The layer's float weight and bias where calibration replaces them (GPTQ's rounded weight, the
        #: corrected bias) and the recipe reconstructs: reconstruction's targets are the float model's,
        #: not the model with these replaced (docs/lowbit.md §11). Taken after smoothing or rotation (the
        #: float model's function is unchanged by them); plain attributes, never saved, dropped by
        #: reconstruction.
        self.float_weight: Optional[torch.Tensor] = None
        self.float_bias: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = x / self.smooth
        if self.a_quant is not None:
            x = self.a_quant(x)
        return F.linear(x, self.w_quant(self.weight), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
                + (", smooth=True" if self.smooth is not None else ""))


class QuantConv2d(QuantSite):
    """``nn.Conv2d`` with a weight quantizer (the patch embedding); its image input stays float unless
    an input quantizer is given (RepQ-ViT's 8-bit image, docs/lowbit.md §6)."""

    kind = "conv"
    ROLES = ("w_quant", "a_quant")

    def __init__(self, conv: nn.Conv2d, w_quant: Quantizer, a_quant: Optional[Quantizer] = None):
        super().__init__()
        # padding="valid" is no padding (SigLIP's patch embedding); "same" depends on the input size
        padding = (0,) * len(conv.kernel_size) if conv.padding == "valid" else conv.padding
        if conv.padding_mode != "zeros" or isinstance(padding, str):
            raise ValueError("QuantConv2d supports numeric zero padding only")
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = conv.kernel_size
        self.stride = conv.stride
        self.padding = padding
        self.dilation = conv.dilation
        self.conv_groups = conv.groups
        self.weight = conv.weight
        self.bias = conv.bias
        self.w_quant = w_quant
        self.a_quant = a_quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_quant is not None:
            x = self.a_quant(x)
        return F.conv2d(x, self.w_quant(self.weight), self.bias, self.stride, self.padding, self.dilation, self.conv_groups)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"


class QuantMatMul(QuantSite):
    """``a @ b`` between two activations (the attention matmuls), both operands quantized.

    ``renorm_rows=True`` (the post-softmax operand, ``softmax_renorm``): each row of ``q(a)`` is
    scaled to the sum of the row of ``a`` (:func:`~ptq4vit.quant.renormalize_rows`, docs/lowbit.md §9).
    """

    kind = "matmul"
    ROLES = ("a_quant", "b_quant")

    def __init__(self, a_quant: Quantizer, b_quant: Quantizer, renorm_rows: bool = False):
        super().__init__()
        self.a_quant = a_quant
        self.b_quant = b_quant
        self.renorm_rows = renorm_rows

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        qa = self.a_quant(a)
        if self.renorm_rows and self.a_quant.enabled:
            qa = renormalize_rows(qa, a)
        return qa @ self.b_quant(b)

    def extra_repr(self) -> str:
        return "renorm_rows=True" if self.renorm_rows else ""


class FloatMatMul(nn.Module):
    """``a @ b`` left float by the preset (``quantize_attention=False``): not a quantization site,
    a module of its own so that the export report can name it (docs/deployment.md)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


#: What makes a module a quantization site (a new site class subclasses QuantSite).
QUANT_MODULES = (QuantSite,)

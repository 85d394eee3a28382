"""The quantizers of two operands with their own distributions: the post-softmax operand of
``softmax @ v`` and fc2's post-GELU input (docs/method.md §3-4, docs/lowbit.md §4, §8)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from ..errors import UserError
from .component import Component

LogBase = Literal["log2", "log_sqrt2"]


class SoftmaxOperand(Component):
    """What every softmax variant answers for the search."""

    def quantizes_v_in_split_search(self) -> bool:
        """Whether v is quantized while a twin's split is searched (only the twin has a split)."""
        return True


@dataclass(frozen=True)
class UniformSoftmax(SoftmaxOperand):
    """One uniform quantizer per head. ``renorm``: each quantized row rescaled so that it sums to
    its float row's mass (docs/lowbit.md §9)."""
    variant = "uniform"
    renorm: bool = False

    def flat_fields(self) -> dict:
        return {"softmax_twin": False, "softmax_renorm": self.renorm}


@dataclass(frozen=True)
class TwinSoftmax(SoftmaxOperand):
    """The twin uniform quantizer: ``form`` ``"select"`` (the paper's) or ``"sum"`` (the released
    code's hi + lo); ``split_search_quantized_b``: v quantized while its split is searched (the
    released code leaves it float). ``renorm`` as for the uniform one."""
    variant = "twin"
    form: Literal["select", "sum"] = "select"
    split_search_quantized_b: bool = True
    renorm: bool = False
    #: Search a top of the range with the split (values above it clip; ``"select"`` only, docs/lowbit.md §12).
    top: bool = False

    def check(self) -> None:
        if self.top and self.form != "select":
            raise UserError(f"softmax.top needs softmax.form='select' (the released code's 'sum' form has no top), "
                            f"got form={self.form!r}")

    def quantizes_v_in_split_search(self) -> bool:
        return self.split_search_quantized_b

    def flat_fields(self) -> dict:
        return {"softmax_twin": True, "softmax_twin_form": self.form,
                "split_search_quantized_b": self.split_search_quantized_b, "softmax_renorm": self.renorm,
                "softmax_twin_top": self.top}


@dataclass(frozen=True)
class LogSoftmax(SoftmaxOperand):
    """A log quantizer of ``base`` (docs/lowbit.md §4); under percentile calibration its largest
    level is calibrated, as RepQ-ViT releases it. ``renorm`` as for the uniform one."""
    variant = "log"
    base: LogBase = "log_sqrt2"
    renorm: bool = False

    def flat_fields(self) -> dict:  # (softmax_log_scale depends on the calibration: to_flat sets it)
        return {"softmax_twin": False, "softmax_log": self.base, "softmax_renorm": self.renorm}


@dataclass(frozen=True)
class FloatAttention(SoftmaxOperand):
    """Attention stays float: ``q @ kᵀ`` and ``softmax @ v`` are plain matmuls, not sites, as runtimes
    run them in one fused kernel (docs/deployment.md)."""
    variant = "float"

    def flat_fields(self) -> dict:
        return {"softmax_twin": False, "quantize_attention": False}


Softmax = Union[UniformSoftmax, TwinSoftmax, LogSoftmax, FloatAttention]


@dataclass(frozen=True)
class UniformGelu(Component):
    """fc2's input gets the linear inputs' quantizer (and their smoothing and asymmetry)."""
    variant = "uniform"

    def flat_fields(self) -> dict:
        return {"gelu_twin": False}


@dataclass(frozen=True)
class TwinGelu(Component):
    """The twin uniform quantizer of the post-GELU input; ``pow2``: ``Δ+ = 2^m Δ-`` (integer kernels)."""
    variant = "twin"
    pow2: bool = True

    def flat_fields(self) -> dict:
        return {"gelu_twin": True, "gelu_pow2": self.pow2}


@dataclass(frozen=True)
class LogGelu(Component):
    """A log quantizer of ``base`` with a searched largest level and the twin's fixed negative step
    (docs/lowbit.md §8)."""
    variant = "log"
    base: LogBase = "log2"

    def flat_fields(self) -> dict:
        return {"gelu_twin": False, "gelu_log": self.base}


Gelu = Union[UniformGelu, TwinGelu, LogGelu]

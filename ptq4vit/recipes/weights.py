"""How linear and patch-embedding weights are quantized: scale granularity and rounding."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

from ..errors import UserError
from .component import Component


@dataclass(frozen=True)
class Nearest(Component):
    """Round each weight to the nearest level."""
    variant = "nearest"


@dataclass(frozen=True)
class GPTQ(Component):
    """Second-order error compensation (docs/lowbit.md §3): ``damp`` · mean(diag H) added to diag H,
    columns in decreasing diag H order with ``act_order``, ``block`` columns at a time.
    ``quantized_inputs``: fit the weight to the layer's quantized inputs (docs/lowbit.md §10)."""
    variant = "gptq"
    damp: float = 0.01
    act_order: bool = True
    block: int = 128
    quantized_inputs: bool = False

    def check(self) -> None:
        if self.damp < 0 or self.block < 1:
            raise UserError(f"gptq needs damp >= 0 and block >= 1, got damp={self.damp}, block={self.block}")
        if self.quantized_inputs and self.damp <= 0:
            raise UserError(f"gptq.quantized_inputs needs damp > 0, got {self.damp}")

    def flat_fields(self) -> dict:
        return {"gptq_damp": self.damp, "gptq_act_order": self.act_order, "gptq_block": self.block,
                "gptq_quantized_inputs": self.quantized_inputs}


Rounding = Union[Nearest, GPTQ]


@dataclass(frozen=True)
class Weights(Component):
    """Linear weights: one scale per layer and per q/k/v block (``"block"``) or per output channel;
    the patch embedding's weight per output channel (``conv_per_channel``) or per tensor. Per-channel
    scales and GPTQ calibrate linear weights from ``H = XᵀX`` instead of the alternating search."""
    variant = "weights"
    granularity: Literal["block", "channel"] = "block"
    conv_per_channel: bool = True
    rounding: Rounding = field(default_factory=Nearest)

    @property
    def second_order(self) -> bool:
        """Linear weights calibrated from ``H = XᵀX`` (per-channel scales or GPTQ) instead of the grid search."""
        return self.rounding.variant == "gptq" or self.granularity == "channel"

    def flat_fields(self) -> dict:
        return {"w_granularity": self.granularity, "conv_per_channel": self.conv_per_channel,
                "weight_rounding": self.rounding.variant, **self.rounding.flat_fields()}

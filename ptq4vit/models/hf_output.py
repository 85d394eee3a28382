"""A quantized ``transformers`` model returns one tensor, not a ``ModelOutput``.

Calibration (cross-entropy on the logits), evaluation, the checkpoint round trip and the ONNX export
all read a model's output as one tensor, as timm's models return it. A ``transformers`` model returns
a ``ModelOutput``; its adapter names the field that is the model's output (``logits``, ``pooler_output``)
and :class:`TensorOutputPlan` adds, with the sites, a forward hook that returns that field.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from .adapter import SitePlan


def select_output(module: nn.Module, args: tuple, output, *, field: str) -> torch.Tensor:
    """Forward hook: the ``field`` of a ``ModelOutput``."""
    if isinstance(output, torch.Tensor):
        return output
    value = getattr(output, field, None)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{type(module).__name__} returned {type(output).__name__} without a tensor {field!r}")
    return value


def output_field(model: nn.Module) -> "str | None":
    """The field the hook of :class:`TensorOutputPlan` returns, or None when ``model`` has no such hook."""
    for hook in model._forward_hooks.values():
        if isinstance(hook, functools.partial) and hook.func is select_output:
            return hook.keywords["field"]
    return None


def return_tensor(model: nn.Module, field: str) -> None:
    """Make ``model`` return the ``field`` of its ``ModelOutput`` (once: a model that already does is left)."""
    if output_field(model) is None:
        model.register_forward_hook(functools.partial(select_output, field=field))


class TensorOutputPlan(SitePlan):
    """A site plan that also makes the model return its ``output`` field as a tensor."""

    def __init__(self, family: str, output: str):
        super().__init__(family)
        self.output = output

    def apply(self, model: nn.Module) -> None:
        super().apply(model)
        return_tensor(model, self.output)

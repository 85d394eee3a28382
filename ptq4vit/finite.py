"""Finite values where quantization needs them: the images calibration reads, the scales it writes.

A NaN or an infinity in a calibration image, or a float model that overflows on it, makes
every scale downstream NaN; the quantized model then gives NaN logits on clean images too.
These checks let ``quantize`` refuse such input by name instead, and let ``save`` and ``load``
refuse a checkpoint whose scales are unusable.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def nonfinite_count(t: torch.Tensor) -> int:
    """How many values of the floating tensor ``t`` are NaN or infinite."""
    if t.numel() == 0:
        return 0
    lo, hi = torch.aminmax(t)  # NaN propagates: no temporary the size of t in the common, finite case
    if bool(torch.isfinite(lo) & torch.isfinite(hi)):
        return 0
    return t.numel() - int(torch.isfinite(t).sum())


def bad_scales(model: nn.Module) -> list[tuple[str, float]]:
    """``(buffer path, first bad value)`` of every calibrated buffer of ``model`` that is not finite, or
    not positive where the module lists it in ``positive_buffers`` (a step or divisor: a scale, a split)."""
    bad = []
    for path, module in model.named_modules():
        positive = getattr(module, "positive_buffers", None)
        if positive is None:
            continue
        for name, buf in module.named_buffers(recurse=False):
            if buf is None or not buf.is_floating_point():
                continue
            values = buf.detach().float().reshape(-1)
            wrong = ~torch.isfinite(values)
            if name in positive:
                wrong |= values <= 0
            if bool(wrong.any()):
                bad.append((f"{path}.{name}" if path else name, float(values[wrong][0])))
    return bad


def bad_scale_problem(model: nn.Module) -> Optional[str]:
    """The first buffer :func:`bad_scales` finds, in words: its path and how many of its values are
    not finite or, all finite, not > 0; None if every buffer is good."""
    bad = bad_scales(model)
    if not bad:
        return None
    where = bad[0][0]
    buf = model.get_buffer(where).detach()
    n = nonfinite_count(buf)
    if n:
        return f"{where} has {n} of {buf.numel()} values that are not finite (NaN or inf)"
    # all finite, so bad_scales found it by its module's positive_buffers
    n = int((buf <= 0).sum())
    return f"{where} has {n} of {buf.numel()} values that are not > 0 (a step must be positive)"


__all__ = ["bad_scale_problem", "bad_scales", "nonfinite_count"]

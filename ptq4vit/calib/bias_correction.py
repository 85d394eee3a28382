"""Bias correction: shift a quantized linear layer's bias by the mean output error its quantization
causes on the calibration inputs (docs/deployment.md).

Quantization errors of a layer's input and weight have a systematic part: averaged over the
calibration tokens, ``q(x) q(W)ᵀ`` differs from ``x Wᵀ`` by a per-output-channel offset that every
later layer sees as a shifted activation. Since the mean of a product with a fixed matrix is
the product of the mean, the offset is ``mean(x) Wᵀ - mean(q(x)) q(W)ᵀ``: one pass over the
input (its fake-quantized copy made a block of rows at a time) and two vector-matrix products,
accumulated in float64.
"""
from __future__ import annotations

import logging

import torch

from ..nn import QuantLinear

logger = logging.getLogger(__name__)

#: Rows fake-quantized at a time (bounds the temporary copy of the input).
ROWS_PER_STEP = 4096


def bias_shift(site: QuantLinear, x: torch.Tensor, float_weight: torch.Tensor) -> torch.Tensor:
    """``mean(x) Wᵀ - mean(q(x)) q(W)ᵀ`` (float64, one entry per output channel) over the rows of ``x``
    (the layer's input as it sees it, ``(..., in_features)``); ``W`` is ``float_weight``, ``q(W)``
    the site's quantized weight, ``q(x)`` its input quantizer's output (``x`` itself without one)."""
    x2 = x.reshape(-1, x.shape[-1])
    mean_x = x2.sum(0, dtype=torch.float64)
    if site.a_quant is None:
        mean_q = mean_x
    else:
        mean_q = torch.zeros_like(mean_x)
        for r0 in range(0, x2.shape[0], ROWS_PER_STEP):
            mean_q += site.a_quant.fake_quant(x2[r0:r0 + ROWS_PER_STEP]).sum(0, dtype=torch.float64)
    n = x2.shape[0]
    w_q = site.w_quant.fake_quant(site.weight.detach()).double()
    return (mean_x / n) @ float_weight.double().t() - (mean_q / n) @ w_q.t()


def correct_bias(site: QuantLinear, x: torch.Tensor, float_weight: torch.Tensor) -> None:
    """Add :func:`bias_shift` to the site's bias (a layer without a bias is left as it is)."""
    if site.bias is None:
        logger.debug("bias correction skipped: %s has no bias", site)
        return
    with torch.no_grad():
        site.bias.add_(bias_shift(site, x, float_weight).to(device=site.bias.device, dtype=site.bias.dtype))

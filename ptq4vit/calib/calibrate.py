"""Calibration: choose every site's scales by the alternating search of SPEC §2-4.

Per site, a round searches the weight (matmul: operand A) with the input (B) fixed at its
current scale, then the input with the weight fixed at its new scale; round 1 starts from Δ0.
Each search is an exhaustive batched scan of the candidate grid (see :mod:`.search`). A round
is a deterministic function of the scale it starts from, so once a round ends where the
previous one started, all later rounds would repeat it: the loop stops there with exactly
the result the full number of rounds gives.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import QuantConv2d, QuantLinear, QuantMatMul
from ..presets import Preset
from ..quant import (TwinGeluQuantizer, TwinSoftmaxQuantizer, UniformQuantizer, candidate_factors, gelu_twin_fake_quant,
                     initial_scale, qmax, softmax_split_candidates, softmax_twin_fake_quant, uniform_fake_quant)
from ..quant.quantizers import group_view
from .search import Product, best, score


class _Grid:
    """The candidate multipliers of Δ0 for a preset."""

    def __init__(self, preset: Preset, device: torch.device):
        self.factors = candidate_factors(preset.alpha, preset.beta, preset.n_candidates).to(device)

    def around(self, start: torch.Tensor) -> torch.Tensor:
        """``(n, *start.shape)`` candidates ``Δ0 · factor``."""
        return self.factors.reshape(-1, *([1] * start.dim())) * start


def _uniform(bits: int):
    return lambda x, s: uniform_fake_quant(x, s, bits)


def _group_absmax(w: torch.Tensor, groups: int) -> torch.Tensor:
    return w.reshape(groups, -1).abs().amax(dim=1)


def _fake_quant_weight(w: torch.Tensor, quant: UniformQuantizer, scale: torch.Tensor) -> torch.Tensor:
    if quant.axis is None:
        return uniform_fake_quant(w, scale, quant.bits)
    shape = (quant.groups,) + (1,) * w.dim()
    return uniform_fake_quant(group_view(w, 0, quant.groups), scale.reshape(shape), quant.bits).reshape(w.shape)


class _InputSearch:
    """Search of a linear layer's input scale: a uniform or a post-GELU twin quantizer."""

    def __init__(self, quant, x: torch.Tensor, grid: _Grid):
        self.quant = quant
        bits = quant.bits
        if isinstance(quant, TwinGeluQuantizer):
            neg = quant.neg_scale.to(x)
            self.fn = lambda t, s: gelu_twin_fake_quant(t, s, neg, bits)
            start = initial_scale(x.max().reshape(1), bits)
            self.cands = grid.around(start).reshape(-1)
            if quant.pow2:
                self.cands = _pow2_candidates(self.cands, neg)
        else:
            self.fn = _uniform(bits)
            start = initial_scale(x.abs().max().reshape(1), bits)
            self.cands = grid.around(start).reshape(-1)
        self.scale = start

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.scale)


def _pow2_candidates(grid: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Powers of two times Δ- inside the grid's range (the nearest one if none is inside)."""
    lo = torch.ceil(torch.log2(grid.min() / neg))
    hi = torch.ceil(torch.log2(grid.max() / neg))
    exps = torch.arange(int(lo), int(hi) + 1, device=grid.device, dtype=grid.dtype)
    cands = neg * torch.pow(2.0, exps)
    cands = cands[(cands >= grid.min()) & (cands <= grid.max())]
    if cands.numel() == 0:
        cands = neg * torch.pow(2.0, torch.round(torch.log2(grid.mean() / neg))).reshape(1)
    return cands


def calibrate_linear(site: QuantLinear, x: torch.Tensor, grad: Optional[torch.Tensor], preset: Preset, budget: int) -> None:
    grid = _Grid(preset, x.device)
    w = site.weight.detach()
    x = x.reshape(1, -1, x.shape[-1])
    g = grad.reshape(1, -1, grad.shape[-1]) if grad is not None else None
    p = Product(a=x, b=w.t().unsqueeze(0), bias=None if site.bias is None else site.bias.detach(), grad=g,
                metric=preset.metric)
    wq = site.w_quant
    block = w.shape[0] // wq.groups
    w_start = initial_scale(_group_absmax(w, wq.groups), wq.bits)
    w_cands = grid.around(w_start).repeat_interleave(block, dim=1)   # (n, out): each column's candidate
    first_col = torch.arange(wq.groups, device=x.device) * block
    inp = _InputSearch(site.a_quant, x, grid) if site.a_quant is not None else None

    w_scale = w_start
    for _ in range(preset.rounds):
        x_fixed = inp.apply(x) if inp is not None else x
        idx = best(score(p, "b", x_fixed, _uniform(wq.bits), w_cands, budget, feature_groups=wq.groups))
        w_scale = w_cands[idx, first_col]
        if inp is None:
            break  # nothing alternates with the weight: further rounds repeat this one
        w_fixed = _fake_quant_weight(w, wq, w_scale).t().unsqueeze(0)
        new = inp.cands[best(score(p, "a", w_fixed, inp.fn, inp.cands.reshape(-1, 1), budget))].reshape(1)
        converged = torch.equal(new, inp.scale)
        inp.scale = new
        if converged:
            break
    wq.set_scale(w_scale)
    if inp is not None:
        inp.quant.set_scale(inp.scale)


def calibrate_conv(site: QuantConv2d, x: torch.Tensor, grad: Optional[torch.Tensor], preset: Preset, budget: int) -> None:
    """Weight-only search of the patch embedding, seen as a linear layer over unfolded patches."""
    grid = _Grid(preset, x.device)
    w = site.weight.detach()
    cout = w.shape[0]
    patches = F.unfold(x, site.kernel_size, site.dilation, site.padding, site.stride).transpose(1, 2)  # (N, L, CKK)
    positions = patches.shape[1]
    g = grad.flatten(2).transpose(1, 2).reshape(1, -1, cout) if grad is not None else None
    p = Product(a=patches.reshape(1, -1, patches.shape[-1]), b=w.reshape(cout, -1).t().unsqueeze(0),
                bias=None if site.bias is None else site.bias.detach(), grad=g, metric=preset.metric)
    wq = site.w_quant
    w_start = initial_scale(_group_absmax(w, wq.groups), wq.bits)
    cands = grid.around(w_start)                                     # (n, groups)
    if wq.groups == cout and cout > 1:
        # Each channel is its own group, scored over its positions in each image.
        idx = best(score(p, "b", p.a, _uniform(wq.bits), cands, budget, rows_per_item=positions))
        wq.set_scale(cands[idx, torch.arange(cout, device=x.device)])
    else:
        idx = best(score(p, "b", p.a, _uniform(wq.bits), cands, budget))
        wq.set_scale(cands[idx[0], :1])


def _per_head_absmax(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1).reshape(t.shape[1], -1).abs().amax(1)


def calibrate_matmul(site: QuantMatMul, a: torch.Tensor, b: torch.Tensor, grad: Optional[torch.Tensor], preset: Preset,
                     budget: int) -> None:
    """Search an attention matmul ``a @ b`` with operands ``(images, heads, rows, cols)``."""
    grid = _Grid(preset, a.device)
    heads = a.shape[1]
    p = Product(a=a.flatten(0, 1), b=b.flatten(0, 1), grad=grad.flatten(0, 1) if grad is not None else None,
                metric=preset.metric, heads=heads)
    per_head_view = (1, heads, 1, 1)
    bq: UniformQuantizer = site.b_quant
    b_start = initial_scale(_per_head_absmax(b), bq.bits)
    b_cands = grid.around(b_start)                                   # (n, heads)
    b_scale = b_start
    aq = site.a_quant
    twin = isinstance(aq, TwinSoftmaxQuantizer)
    head_ids = torch.arange(heads, device=a.device)
    if twin:
        a_fn = lambda t, s: softmax_twin_fake_quant(t, s, aq.bits, aq.form)
        a_cands = softmax_split_candidates().to(a.device).reshape(-1, 1)
        b_quantized_in_a_search = preset.split_search_quantized_b
    else:
        a_fn = _uniform(aq.bits)
        a_cands = grid.around(initial_scale(_per_head_absmax(a), aq.bits))   # (n, heads)
        b_quantized_in_a_search = True

    a_scale = None
    for _ in range(preset.rounds):
        b_fixed = uniform_fake_quant(b, b_scale.reshape(per_head_view), bq.bits) if b_quantized_in_a_search else b
        scores = score(p, "a", b_fixed.flatten(0, 1), a_fn, a_cands, budget, per_head=not twin)
        if twin:
            a_scale = a_cands[best(scores)[0], 0]
            a_fixed = a_fn(a, a_scale)
        else:
            a_scale = a_cands[best(scores), head_ids]
            a_fixed = a_fn(a, a_scale.reshape(per_head_view))
        scores = score(p, "b", a_fixed.flatten(0, 1), _uniform(bq.bits), b_cands, budget, per_head=True)
        new = b_cands[best(scores), head_ids]
        # With v float in the split search (official), the next round would repeat this one.
        converged = torch.equal(new, b_scale) or not b_quantized_in_a_search
        b_scale = new
        if converged:
            break
    if twin:
        aq.set_split(a_scale)
    else:
        aq.set_scale(a_scale)
    bq.set_scale(b_scale)


def calibrate_site(site: nn.Module, inputs: list[torch.Tensor], grad: Optional[torch.Tensor], preset: Preset, budget: int) -> None:
    if isinstance(site, QuantLinear):
        calibrate_linear(site, inputs[0], grad, preset, budget)
    elif isinstance(site, QuantConv2d):
        calibrate_conv(site, inputs[0], grad, preset, budget)
    elif isinstance(site, QuantMatMul):
        calibrate_matmul(site, inputs[0], inputs[1], grad, preset, budget)
    else:
        raise TypeError(f"not a quantization site: {type(site).__name__}")

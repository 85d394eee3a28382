"""Calibration: choose every site's scales by the alternating search of docs/method.md §2-4.

Per site, a round searches the weight (matmul: operand A) with the input (B) fixed at its
current scale, then the input with the weight fixed at its new scale; round 1 starts from Δ0.
Each group (a q/k/v block of a qkv weight, a head of an attention operand) has its own
product, scored on its own outputs, and its own argmax. A round is a deterministic function
of the scales it starts from, so once a round ends where the previous one started, every
later round would repeat it: the loop stops there with the result all rounds would give.

The search runs in float32 on the model's device whatever the model's dtype: captured
half-precision operands are widened (exactly), and the codes it scores are the codes the
half-precision forward computes (see :mod:`ptq4vit.quant.uniform`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import QuantConv2d, QuantLinear, QuantMatMul
from ..recipes import Recipe, get_recipe
from ..recipes.calibration import GridSearch
from ..recipes.flat import Preset
from ..quant import (MIN_SCALE, KindRegistry, candidate_factors, initial_scale, renormalize_rows,
                     uniform_fake_quant)
from .bias_correction import correct_bias
from .gptq import compensated_target, gptq_round, input_energy, input_hessian, row_scales, search_group_scales
from .metrics import cosine_
from .released_order import conv_scores, linear_scores, matmul_scores, split_scores
from .search import Product, best_index, row_scores, score


class _Grid:
    """The candidate multipliers of Δ0 of a grid search."""

    def __init__(self, search: GridSearch, device: torch.device):
        self.factors = candidate_factors(search.alpha, search.beta, search.n_candidates).to(device)

    def around(self, start: torch.Tensor) -> torch.Tensor:
        """``(n, *start.shape)`` candidates ``Δ0 · factor``, none below MIN_SCALE (docs/method.md §2)."""
        return (self.factors.reshape(-1, *([1] * start.dim())) * start).clamp_min_(MIN_SCALE)


def _search_float(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` detached and widened to float32 (the same tensor when it already is float32)."""
    return None if t is None else t.detach().to(torch.promote_types(t.dtype, torch.float32))


def _uniform(bits: int):
    return lambda x, s: uniform_fake_quant(x, s, bits)


class _InputSearch:
    """A linear layer's input quantizer during the search, in the space the quantizer describes
    (:meth:`~ptq4vit.quant.Quantizer.scale_search`): candidates around its start, or those it can take."""

    def __init__(self, quant, x: torch.Tensor, grid: _Grid):
        space = quant.scale_search(x)
        self.fn, self._store = space.fake_quant, space.store
        start = space.start
        self.cands = grid.around(start).reshape(-1)
        if space.restrict is not None:
            self.cands = space.restrict(self.cands)
            start = self.cands[(self.cands - start).abs().argmin()].reshape(1)
        self.scale = start

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.scale)

    def store(self) -> None:
        """Write the chosen scale (and what the quantizer keeps with it) into the quantizer."""
        self._store(self.scale)


def _in_released_order(metric: str, every_row: bool) -> bool:
    """Cosine scores are reduced in the released code's order (:mod:`.released_order`) when
    every row is scored, as the released code scores them; a sample of rows has no such order and
    keeps the float64 sum of :func:`.search.score`."""
    return metric == "cosine" and every_row


def _some_rows(t: Optional[torch.Tensor], dim: int, keep: int) -> Optional[torch.Tensor]:
    """``keep`` evenly spaced entries of ``t`` along ``dim`` (all of them when ``keep`` is 0 or
    not smaller): the rows a fast search scores candidates on (docs/method.md §2)."""
    if t is None or keep <= 0 or t.shape[dim] <= keep:
        return t
    idx = torch.linspace(0, t.shape[dim] - 1, keep, device=t.device).round().long()
    return t.index_select(dim, idx)


def calibrate_linear(site: QuantLinear, x: torch.Tensor, grad: Optional[torch.Tensor], recipe: Recipe, budget: int) -> None:
    search, metric = recipe.calibration, recipe.calibration.metric.variant  # the grid search and its score
    grid = _Grid(search, x.device)
    w = _search_float(site.weight)
    bias = _search_float(site.bias)
    images = x.shape[0]
    x_all = x.reshape(1, -1, x.shape[-1])                      # the input's range comes from every row
    x = _some_rows(x_all, 1, search.search_rows)
    released = _in_released_order(metric, x.shape[1] == x_all.shape[1])
    tokens = x.shape[1] // images
    floats_per_image = tokens * (w.shape[1] + w.shape[0])      # the released code's input and output values
    g = _some_rows(grad.reshape(1, -1, grad.shape[-1]), 1, search.search_rows) if grad is not None else None
    wq = site.w_quant
    size = w.shape[0] // wq.groups
    blocks = [slice(i * size, (i + 1) * size) for i in range(wq.groups)]

    # One product per weight block, scored on its own output columns; the whole layer for the
    # input. Several blocks' products are made one at a time, so that no more than one
    # output-sized tensor exists at once (a single-block layer keeps its one product).
    single = Product(a=x, b=w.t().unsqueeze(0), bias=bias, grad=g, metric=metric) if wq.groups == 1 else None

    def block_product(cols: slice) -> Product:
        if single is not None:
            return single
        return Product(a=x, b=w[cols].t().unsqueeze(0), bias=bias[cols] if bias is not None else None,
                       grad=g[..., cols] if g is not None else None, metric=metric)

    def layer_product() -> Product:
        if single is not None:
            return single
        return Product(a=x, b=w.t().unsqueeze(0), bias=bias, grad=g, metric=metric)

    w_start = initial_scale(torch.stack([w[cols].abs().max() for cols in blocks]), wq.bits)
    w_cands = grid.around(w_start)                                   # (n, groups)
    inp = _InputSearch(site.a_quant, x_all, grid) if site.a_quant is not None else None

    w_scale = w_start
    for _ in range(search.rounds):
        x_fixed = inp.apply(x) if inp is not None else x
        if released:  # every block's rows together: the released code reduces them in one tensor
            cos = torch.stack([row_scores(block_product(cols), "b", x_fixed, _uniform(wq.bits), w_cands[:, i:i + 1],
                                          budget).reshape(-1, images, tokens) for i, cols in enumerate(blocks)])
            best = linear_scores(cos, floats_per_image).argmax(0)
            w_scale = w_cands[best, torch.arange(len(blocks), device=best.device)]
        else:
            w_scale = torch.stack([w_cands[best_index(block_product(cols), "b", x_fixed, _uniform(wq.bits),
                                                      w_cands[:, i:i + 1], budget), i]
                                   for i, cols in enumerate(blocks)])
        del x_fixed
        if inp is None:
            break  # nothing alternates with the weight: further rounds repeat this one
        w_fixed = torch.cat([uniform_fake_quant(w[cols], w_scale[i], wq.bits) for i, cols in enumerate(blocks)])
        if released:
            cos = row_scores(layer_product(), "a", w_fixed.t().unsqueeze(0), inp.fn, inp.cands.reshape(-1, 1), budget)
            new = inp.cands[linear_scores(cos.reshape(1, -1, images, tokens), floats_per_image)[:, 0].argmax()]
        else:
            new = inp.cands[best_index(layer_product(), "a", w_fixed.t().unsqueeze(0), inp.fn,
                                       inp.cands.reshape(-1, 1), budget)]
        converged = torch.equal(new.reshape(1), inp.scale)
        inp.scale = new.reshape(1)
        if converged:
            break
    wq.set_scale(w_scale)
    if inp is not None:
        inp.store()


def calibrate_linear_second_order(site: QuantLinear, x: torch.Tensor, grad: Optional[torch.Tensor], recipe: Recipe,
                                  budget: int) -> None:
    """Weight scales from ``H`` (its diagonal when rounding to nearest), round-to-nearest or GPTQ
    weights, then the input scale search (scored on ``search_rows`` rows, ranges from all).

    With GPTQ's ``quantized_inputs`` the input scale is first searched against the round-to-nearest
    weight, GPTQ then rounds the weight fitted to those quantized inputs (docs/lowbit.md §10), and
    the input scale is searched again against the result.
    """
    search, metric = recipe.calibration, recipe.calibration.metric.variant  # the grid search and its score
    rounding = recipe.weights.rounding
    wq = site.w_quant
    w = site.weight.detach()
    x2 = x.reshape(-1, x.shape[-1])
    gptq = rounding.variant == "gptq"
    h = input_hessian(x2) if gptq else input_energy(x2)
    factors = candidate_factors(search.alpha, search.beta, search.n_candidates).to(w.device)
    scales = search_group_scales(w, h, wq.groups, wq.bits, factors, budget)
    per_row = row_scales(scales, w.shape[0])
    inp = layer = None
    if site.a_quant is not None:
        grid = _Grid(search, x.device)
        x_all = x2.unsqueeze(0)
        xx = _some_rows(x_all, 1, search.search_rows)
        g = _some_rows(grad.reshape(1, -1, grad.shape[-1]), 1, search.search_rows) if grad is not None else None
        layer = Product(a=xx, b=w.t().unsqueeze(0), bias=site.bias.detach() if site.bias is not None else None,
                        grad=g, metric=metric)
        inp = _InputSearch(site.a_quant, x_all, grid)

    def search_input(w_fixed: torch.Tensor) -> None:
        inp.scale = inp.cands[best_index(layer, "a", w_fixed.t().unsqueeze(0), inp.fn, inp.cands.reshape(-1, 1),
                                         budget)].reshape(1)

    if gptq and inp is not None and rounding.quantized_inputs:
        search_input(uniform_fake_quant(w, per_row.reshape(-1, 1), wq.bits))
        target, h = compensated_target(w, x2, inp.apply, rounding.damp)
        scales = search_group_scales(target, h, wq.groups, wq.bits, factors, budget).to(w.dtype)
        per_row = row_scales(scales, w.shape[0])
    else:
        target = w
    if gptq:
        wq_values, unrounded = gptq_round(target, h.to(w.device), per_row, wq.bits, damp=rounding.damp,
                                          act_order=rounding.act_order, block=rounding.block)
        wq_values = wq_values.to(w.dtype)
        if recipe.reconstruction.learns_rounding():
            # in the weight's dtype a start GPTQ rounded in float64 can cross half a step: it then starts on GPTQ's code
            start = unrounded.to(w.dtype)
            site.rounding_start = torch.where(uniform_fake_quant(start, per_row.reshape(-1, 1), wq.bits) == wq_values,
                                              start, wq_values)
    else:
        wq_values = uniform_fake_quant(w, per_row.reshape(-1, 1), wq.bits)
    if inp is not None:
        search_input(wq_values)
        inp.store()
    if gptq:  # GPTQ's values are not what the quantizer rounds W to: they replace W (round to nearest: it is)
        with torch.no_grad():
            site.weight.copy_(wq_values)
    wq.set_scale(scales)


def _conv_cosines(site: QuantConv2d, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor],
                  cands: torch.Tensor, bits: int, budget: int) -> torch.Tensor:
    """``(n, images, channels)``: each channel's cosine over its positions in each image, for the
    per-channel weight candidates ``cands: (n, channels)``, with the outputs computed by
    ``F.conv2d`` as the released code computes them (a GEMM of unfolded patches rounds otherwise),
    many candidates' channels in one convolution."""
    def conv(weight, b):
        return F.conv2d(x, weight, b, site.stride, site.padding, site.dilation, site.conv_groups)
    out = conv(w, bias).flatten(2).unsqueeze(1)                                   # (images, 1, channels, positions)
    images, _, cout, positions = out.shape
    step = max(1, budget // (4 * 3 * images * cout * positions))
    cos = []
    for c0 in range(0, cands.shape[0], step):
        chunk = cands[c0:c0 + step]
        ws = uniform_fake_quant(w.unsqueeze(0), chunk.reshape(*chunk.shape, 1, 1, 1), bits).flatten(0, 1)
        res = conv(ws, bias.repeat(len(chunk)) if bias is not None else None)   # (images, c * channels, h, w)
        cos.append(cosine_(res.reshape(images, len(chunk), cout, positions), out, -1).transpose(0, 1))
    return torch.cat(cos)


def calibrate_conv(site: QuantConv2d, x: torch.Tensor, grad: Optional[torch.Tensor], recipe: Recipe, budget: int) -> None:
    """Weight-only search of the patch embedding, seen as a linear layer over unfolded patches."""
    search, metric = recipe.calibration, recipe.calibration.metric.variant  # the grid search and its score
    grid = _Grid(search, x.device)
    w = _search_float(site.weight)
    cout = w.shape[0]
    unfolded = F.unfold(x, site.kernel_size, site.dilation, site.padding, site.stride)  # (N, CKK, L)
    positions, ckk = unfolded.shape[2], unfolded.shape[1]
    patches = unfolded.transpose(1, 2).reshape(1, -1, ckk)                                  # one copy, as rows
    del unfolded
    g = grad.flatten(2).transpose(1, 2).reshape(1, -1, cout) if grad is not None else None
    p = Product(a=patches, b=w.reshape(cout, -1).t().unsqueeze(0), bias=_search_float(site.bias), grad=g,
                metric=metric)
    del patches
    wq = site.w_quant
    if wq.groups == cout and cout > 1:
        # Each channel is its own group, scored over its positions in each image.
        cands = grid.around(initial_scale(w.reshape(cout, -1).abs().amax(1), wq.bits))   # (n, cout)
        if _in_released_order(metric, True):
            cos = _conv_cosines(site, x, w, _search_float(site.bias), cands, wq.bits, budget)
            idx = conv_scores(cos, x[0].numel() + cout * positions).argmax(0)
        else:
            idx = score(p, "b", p.a, _uniform(wq.bits), cands, budget, rows_per_item=positions).argmax(0)
        wq.set_scale(cands[idx, torch.arange(cout, device=x.device)])
    else:
        cands = grid.around(initial_scale(w.abs().max().reshape(1), wq.bits))             # (n, 1)
        wq.set_scale(cands[best_index(p, "b", p.a, _uniform(wq.bits), cands, budget)])


def calibrate_matmul(site: QuantMatMul, a: torch.Tensor, b: torch.Tensor, grad: Optional[torch.Tensor], recipe: Recipe,
                     budget: int) -> None:
    """Search an attention matmul ``a @ b`` with operands ``(images, heads, rows, cols)``."""
    search, metric = recipe.calibration, recipe.calibration.metric.variant  # the grid search and its score
    grid = _Grid(search, a.device)
    heads = a.shape[1]
    a_all = a                                                  # ranges from every row, scores on some
    rows = -(-search.search_rows // a.shape[0]) if search.search_rows else 0
    a, grad = _some_rows(a, 2, rows), _some_rows(grad, 2, rows)
    released = _in_released_order(metric, a.shape[2] == a_all.shape[2])
    images = a.shape[0]
    # The released code's values per image: both operands and twice the output.
    floats_per_image = heads * (a.shape[2] * a.shape[3] + b.shape[2] * b.shape[3] + 2 * a.shape[2] * b.shape[3])
    aq = site.a_quant
    a_space = aq.scale_search(a_all)
    if a_space is None:
        return _calibrate_matmul_fixed_a(site, a, b, grad, metric, budget, grid)
    renorm = _renormalized if site.renorm_rows else (lambda fn: fn)

    # Made when searched, so one head's float product exists at a time.
    def head_product(h: int) -> Product:
        return Product(a=a[:, h], b=b[:, h], grad=grad[:, h] if grad is not None else None, metric=metric)

    b_space = site.b_quant.scale_search(b)
    b_scale = b_space.start
    b_cands = grid.around(b_scale)                                   # (n, heads)
    a_fn = renorm(a_space.fake_quant)
    a_cands = a_space.fixed if a_space.fixed is not None else grid.around(a_space.start)   # (n, 1) or (n, heads)
    twin = aq.whole_operand_search
    clip_space = aq.clip_search(a_all) if twin else None  # a softmax twin's top (docs/lowbit.md §12)
    if twin:
        # One parameter for the layer (the softmax split), scored over all heads at once.
        def whole_product() -> Product:
            return Product(a=a.flatten(0, 1), b=b.flatten(0, 1), grad=grad.flatten(0, 1) if grad is not None else None,
                           metric=metric)
        b_quantized_in_a_search = recipe.softmax.quantizes_v_in_split_search()
    else:
        b_quantized_in_a_search = True

    def quant_b(scale):
        return b_space.fake_quant(b, scale.reshape(1, heads, 1, 1))

    def per_head_cosine(side: str, fixed: torch.Tensor, quant, cands: torch.Tensor) -> torch.Tensor:
        """Every head's best candidate, its cosines reduced with all heads' in the released order."""
        cos = torch.stack([row_scores(head_product(h), side, fixed[:, h], quant, cands[:, h:h + 1], budget)
                           for h in range(heads)])
        best = matmul_scores(cos, floats_per_image).argmax(0)
        return cands[best, torch.arange(heads, device=best.device)]

    a_scale = None
    for _ in range(search.rounds):
        b_fixed = quant_b(b_scale) if b_quantized_in_a_search else b
        if twin and released:
            cos = row_scores(whole_product(), "a", b_fixed.flatten(0, 1), a_fn, a_cands, budget)
            a_scale = a_cands[split_scores(cos.reshape(len(a_cands), images, heads, -1), floats_per_image).argmax(), 0]
        elif twin:
            a_scale = a_cands[best_index(whole_product(), "a", b_fixed.flatten(0, 1), a_fn, a_cands, budget), 0]
        elif released:
            a_scale = per_head_cosine("a", b_fixed, a_fn, a_cands)
        else:
            a_scale = torch.stack([a_cands[best_index(head_product(h), "a", b_fixed[:, h], a_fn, a_cands[:, h:h + 1],
                                                      budget), h]
                                   for h in range(heads)])
        if clip_space is not None:  # the top at this split, then the split at that top (a_fn reads the top)
            a_space.store(a_scale)
            tops = clip_space.fixed
            clip_space.store(tops[best_index(whole_product(), "a", b_fixed.flatten(0, 1), renorm(clip_space.fake_quant),
                                             tops, budget), 0])
            a_scale = a_cands[best_index(whole_product(), "a", b_fixed.flatten(0, 1), a_fn, a_cands, budget), 0]
        del b_fixed
        a_fixed = a_fn(a, a_scale) if twin else a_fn(a, a_scale.reshape(1, heads, 1, 1))
        if released:
            new = per_head_cosine("b", a_fixed, b_space.fake_quant, b_cands)
        else:
            new = torch.stack([b_cands[best_index(head_product(h), "b", a_fixed[:, h], b_space.fake_quant,
                                                  b_cands[:, h:h + 1], budget), h]
                               for h in range(heads)])
        del a_fixed
        # With v float in the split search (official), the next round would repeat this one.
        converged = torch.equal(new, b_scale) or not b_quantized_in_a_search
        b_scale = new
        if converged:
            break
    a_space.store(a_scale)
    b_space.store(b_scale)


def _renormalized(fn):
    """``fn``'s quantized operand with its rows renormalized, as :class:`QuantMatMul` computes it."""
    return lambda t, s: renormalize_rows(fn(t, s), t)


def _calibrate_matmul_fixed_a(site: QuantMatMul, a: torch.Tensor, b: torch.Tensor, grad: Optional[torch.Tensor],
                              metric: str, budget: int, grid: _Grid) -> None:
    """Operand A has no parameter to search (log quantizer): search B's per-head scales once against q(A)."""
    heads = a.shape[1]
    a_fixed = site.a_quant.fake_quant(a)
    if site.renorm_rows:
        a_fixed = renormalize_rows(a_fixed, a)
    b_space = site.b_quant.scale_search(b)
    b_cands = grid.around(b_space.start)
    per_head = [Product(a=a[:, h], b=b[:, h], grad=grad[:, h] if grad is not None else None, metric=metric)
                for h in range(heads)]
    b_space.store(torch.stack([b_cands[best_index(prod, "b", a_fixed[:, h], b_space.fake_quant, b_cands[:, h:h + 1], budget), h]
                               for h, prod in enumerate(per_head)]))


def smoothing_factors(x: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s_j = max|x_j|^α / max|W_:j|^(1-α)`` per input channel ``j`` (float32), 1 for a
    channel that is zero in ``x`` or ``W`` (nothing to migrate there)."""
    xmax = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
    wmax = w.abs().amax(0).float()
    s = xmax.pow(alpha) / wmax.pow(1 - alpha)
    return torch.where((xmax > 0) & (wmax > 0) & torch.isfinite(s), s, torch.ones_like(s))


def _smooth(site: QuantLinear, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Set the site's smoothing divisor from its captured input, fold it into the weight
    (``W diag(s)``) and return the input as the layer now sees it (``x / s``)."""
    s = smoothing_factors(x, site.weight.detach(), alpha)
    with torch.no_grad():
        site.smooth.copy_(s)
        site.weight.mul_(site.smooth)
    return x / site.smooth.to(x.dtype)


def _calibrate_linear_site(site: QuantLinear, inputs: list[torch.Tensor], grad: Optional[torch.Tensor], recipe: Recipe,
                           budget: int) -> None:
    """Smoothing first (its divisor changes the input the search sees), then the first- or
    second-order search, then bias correction against the float (smoothed) weight."""
    x = inputs[0]
    if site.smooth is not None:
        smoothing = recipe.transform("smoothing")
        x = _smooth(site, x, smoothing.alpha if smoothing is not None else 0.0)
    # The layer's float weight (smoothed), before GPTQ replaces it: bias correction's reference.
    float_weight = site.weight.detach().clone() if recipe.transform("bias_correction") is not None else None
    if recipe.reconstruction.variant != "none":  # reconstruction learns against the float layer
        if recipe.weights.rounding.variant == "gptq":  # the same float weight bias correction reads, not a second copy
            site.float_weight = float_weight if float_weight is not None else site.weight.detach().clone()
        if float_weight is not None and site.bias is not None:
            site.float_bias = site.bias.detach().clone()
    if recipe.weights.second_order:
        calibrate_linear_second_order(site, x, grad, recipe, budget)
    else:
        calibrate_linear(site, x, grad, recipe, budget)
    if float_weight is not None:
        correct_bias(site, x, float_weight)


#: The search of each site class (a new site class registers its own).
SITE_SEARCHES: KindRegistry = KindRegistry("calibration search of site")
SITE_SEARCHES.register(QuantLinear, _calibrate_linear_site)
SITE_SEARCHES.register(QuantConv2d, lambda site, inputs, grad, recipe, budget:
                       calibrate_conv(site, inputs[0], grad, recipe, budget))
SITE_SEARCHES.register(QuantMatMul, lambda site, inputs, grad, recipe, budget:
                       calibrate_matmul(site, inputs[0], inputs[1], grad, recipe, budget))


def calibrate_site(site: nn.Module, inputs: list[torch.Tensor], grad: Optional[torch.Tensor],
                   recipe: "Recipe | Preset", budget: int) -> None:
    """Choose ``site``'s scales from its captured inputs and output gradient (any float dtype), by
    ``recipe``'s grid search (a flat :class:`Preset` is read as the recipe it means)."""
    recipe = get_recipe(recipe)
    search = SITE_SEARCHES.find(site)
    if search is None:
        raise TypeError(f"not a quantization site: {type(site).__name__}")
    search(site, [_search_float(t) for t in inputs], _search_float(grad), recipe, budget)

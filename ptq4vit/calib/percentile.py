"""RepQ-ViT's calibration (``calibration="percentile"``, docs/lowbit.md §6).

Every range is the best of three percentile pairs: for ``p`` in 0.999, 0.9999, 0.99999 the
quantiles ``(1 - p, p)`` of the group's values give a step and a zero point, and the pair whose
fake quantization has the smallest mean squared error wins (the first on ties). Weights are
calibrated per output channel from the weights alone. Activations are calibrated in one forward
pass over all calibration images in model order, each site on the input that the already
quantized sites before it produce, and is quantized from then on (the released code's order).

With ``reparam_ln`` the input of each linear layer after a LayerNorm is first calibrated per
channel (and quantized per channel for the rest of the pass); afterwards the channels' ranges are
folded into the LayerNorm and the layer (:mod:`ptq4vit.transforms.reparam`), whose weight is then
calibrated again.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..quant import AsymmetricQuantizer, KindRegistry, LogQuantizer, Quantizer, asymmetric_fake_quant, range_to_step
from ..quant.log import scaled_log_fake_quant
from ..transforms.reparam import fold_channel_ranges

log = logging.getLogger(__name__)

#: A site's input quantizers, in the order of its forward's arguments.
INPUT_ROLES = ("a_quant", "b_quant")

#: The upper percentiles tried for each range (the lower one is ``1 - p``).
PERCENTILES = (0.999, 0.9999, 0.99999)


def quantiles(rows: torch.Tensor, qs: tuple[float, ...]) -> torch.Tensor:
    """``torch.quantile(rows, q, dim=1)`` (linear interpolation) for every ``q``: ``(len(qs), G)``.

    As torch.quantile does, ``q`` is first rounded to the rows' dtype and the rank ``q·(n-1)`` then
    taken in float64, so the results are torch.quantile's to the last bit (tests/test_repq.py).
    The percentiles sit near the ends, so only the order statistics there are found (``topk`` from
    each end) instead of sorting every row.
    """
    n = rows.shape[1]
    ranks = [float(torch.tensor(q, dtype=rows.dtype).double()) * (n - 1) for q in qs]
    positions = {p for r in ranks for p in (math.floor(r), min(math.ceil(r), n - 1))}
    high = [p for p in positions if 2 * p >= n]
    low = [p for p in positions if 2 * p < n]
    order: dict[int, torch.Tensor] = {}
    if high:  # top values, descending: position p (ascending order) is index n-1-p
        top = rows.topk(n - min(high), dim=1, largest=True, sorted=True).values
        order.update({p: top[:, n - 1 - p] for p in high})
    if low:
        bottom = rows.topk(max(low) + 1, dim=1, largest=False, sorted=True).values
        order.update({p: bottom[:, p] for p in low})
    out = []
    for r in ranks:
        below, above = math.floor(r), min(math.ceil(r), n - 1)
        weight = float(torch.tensor(r - below, dtype=torch.float64).to(rows.dtype))
        out.append(torch.lerp(order[below], order[above], weight))
    return torch.stack(out)


def percentile_ranges(rows: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Δ, z)`` per row of ``rows`` (``(G, n)``, float32): the best of the percentile pairs by MSE."""
    rows = rows.float()
    qs = quantiles(rows, tuple(PERCENTILES) + tuple(1.0 - p for p in PERCENTILES))
    best = torch.full((rows.shape[0],), float("inf"), device=rows.device)
    step = torch.ones_like(best)
    zp = torch.zeros_like(best)
    k = len(PERCENTILES)
    for i in range(k):
        s, z = range_to_step(qs[k + i], qs[i], bits)
        s1, z1 = s[:, None], z[:, None]
        err = asymmetric_fake_quant(rows, s1, z1, bits).sub_(rows)
        score = err.square_().mean(dim=1)
        better = score < best
        best = torch.where(better, score, best)
        step = torch.where(better, s, step)
        zp = torch.where(better, z, zp)
    return step, zp


def log_scale(x: torch.Tensor, bits: int, base: str) -> torch.Tensor:
    """The largest level of RepQ-ViT's log quantizer: the upper percentile with the smallest MSE."""
    flat = x.detach().float().reshape(1, -1)
    best, chosen = float("inf"), None
    for delta in quantiles(flat, PERCENTILES)[:, 0]:
        score = float((scaled_log_fake_quant(flat, delta, bits, base) - flat).square_().mean())
        if score < best:
            best, chosen = score, delta
    return chosen if chosen is not None else flat.max()


def _init_log(q: LogQuantizer, x: torch.Tensor) -> None:
    q.set_scale(log_scale(x, q.bits, q.base))


def _init_asymmetric(q: AsymmetricQuantizer, x: torch.Tensor) -> None:
    if q.axis is not None:
        raise TypeError(f"percentile calibration has no initialisation for {q!r}")
    q.set_params(*percentile_ranges(x.detach().reshape(1, -1), q.bits))


#: How percentile calibration initialises a per-tensor activation quantizer, per kind.
TENSOR_INITS: KindRegistry = KindRegistry("percentile initialisation")
TENSOR_INITS.register(LogQuantizer, _init_log)
TENSOR_INITS.register(AsymmetricQuantizer, _init_asymmetric)


def calibrate_tensor(q: Quantizer, x: torch.Tensor) -> None:
    """Calibrate a per-tensor activation quantizer (asymmetric, or the scaled log one) on ``x``."""
    init = TENSOR_INITS.find(q)
    if init is None:
        raise TypeError(f"percentile calibration has no initialisation for {q!r}")
    init(q, x)


def calibrate_weight(site: nn.Module) -> None:
    """Per-output-channel ranges of a site's weight."""
    q = site.w_quant
    per_channel_spec = {"type": AsymmetricQuantizer.__name__, "bits": q.bits, "groups": site.weight.shape[0], "axis": 0}
    if q.spec() != per_channel_spec:
        raise TypeError(f"percentile calibration needs per-channel asymmetric weights, got {q!r}")
    q.set_params(*percentile_ranges(site.weight.detach().reshape(q.groups, -1), q.bits))


def per_channel(x: torch.Tensor, bits: int) -> AsymmetricQuantizer:
    """A per-channel (last dim) asymmetric quantizer calibrated on ``x``."""
    channels = x.shape[-1]
    q = AsymmetricQuantizer(bits, channels, axis=-1, device=x.device)
    q.set_params(*percentile_ranges(x.detach().reshape(-1, channels).t(), bits))
    return q


@torch.no_grad()
def calibrate_percentile(model: nn.Module, images: torch.Tensor, sites: dict[str, nn.Module],
                         pairs: list[tuple[str, str]], progress: bool = True, desc: str = "calibrating",
                         round_zero_point: bool = False, fold_dtype: Optional[torch.dtype] = None) -> None:
    """Calibrate every site of ``model`` (its quantizers disabled on entry) as RepQ-ViT does.

    ``pairs``: the ``(LayerNorm, linear site)`` paths to reparameterize (empty without ``reparam_ln``);
    ``round_zero_point``: round the zero point each fold leaves (``reparam_round_zero_point``);
    ``fold_dtype``: the precision the folds compute in (float64 with ``reparam_fold_float64``; None:
    the parameters', at least float32).
    All of ``images`` go through the model in one batch, as the released code's one calibration batch.
    """
    for site in sites.values():
        if "w_quant" in site.quantizers():
            calibrate_weight(site)
    targets = {linear for _, linear in pairs}
    final: dict[str, Quantizer] = {}
    bar = tqdm(total=len(sites), desc=desc, unit="layer", disable=not progress)

    def hook(name: str, site: nn.Module, args: tuple) -> Optional[tuple]:
        if name in targets:
            final[name] = site.a_quant
            site.a_quant = per_channel(args[0], site.a_quant.bits)
        else:
            quantizers = site.quantizers()
            for role, x in zip(INPUT_ROLES, args):      # a site's inputs, in the order of its forward's arguments
                if role in quantizers:
                    calibrate_tensor(quantizers[role], x)
        for q in site.quantizers().values():
            q.enabled = True  # quantized from now on: later sites calibrate on its output
        bar.update()
        return None

    handles = [site.register_forward_pre_hook(lambda m, a, n=name: hook(n, m, a)) for name, site in sites.items()]
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
        bar.close()
    for norm_path, linear in pairs:
        site = sites[linear]
        channel_q = site.a_quant
        step, zp = fold_channel_ranges(model.get_submodule(norm_path), site, channel_q.scale, channel_q.zero_point,
                                       channel_q.bits, round_zero_point, fold_dtype)
        site.a_quant = final[linear]
        site.a_quant.set_params(step, zp)
        calibrate_weight(site)
    log.debug("percentile calibration: %d sites, %d LayerNorm reparameterizations", len(sites), len(pairs))

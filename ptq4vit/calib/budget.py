"""The memory plan of a calibration: what it holds at once, and how to keep that within a budget.

Beyond the model and the calibration images, calibration allocates:

* **captured data**: every site's inputs over the calibration set, and its output gradient
  for the hessian metric, held from the capture pass until the site is searched;
* **the capture pass itself**: the autograd graph of one chunk of images (the tensors the
  forward saves for backward), a few activation-sized transients of the forward and
  backward steps, and for ``kl-official`` the full-batch float pass that makes the targets;
* **a site's search**: copies the search makes of its operands (the fixed operand
  fake-quantized, the float output the candidates are scored against, unfolded patches,
  one attention head's product at a time) and the weight-sized fake-quantized copies;
* **search steps**: the candidates' stacked operands and products, at most
  ``2 * step_bytes`` (each of the two fits one step's byte budget, ``search._plan``);
* **set-aside tensors**: where calibration rewrites sites' weights or biases (GPTQ, smoothing,
  bias correction), two copies of those tensors, so that later capture passes see the float
  ones (``run.calibrate_model``).

On CPU, calibration's workers run capture passes and then site searches side by side: the
capture peak counts one pass per worker; the search peak counts, next to the site starting,
the costliest earlier sites that may still be in flight, and the workers share ``step_bytes``.

All of these are measured on one image (shapes and the autograd graph's saved tensors)
and scaled; :func:`plan` splits the sites into capture groups so that the largest of these
sums stays within the budget, and refuses a budget no split can meet.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import UserError
from ..nn import QuantConv2d, QuantLinear, QuantMatMul
from ..quant import KindRegistry, Quantizer
from .capture import frozen_parameters
from .resources import available_memory
from .search import SEARCH_CHUNK_BYTES

#: Activation-sized tensors a forward or backward step holds at once besides the graph: an
#: op's input, its output and a temporary, and in backward the incoming and outgoing gradient
#: plus the residual stream's accumulated gradient.
TRANSIENT_ACTIVATIONS = 4

#: Share of the budget one search step may plan for (its temporaries are up to twice that).
STEP_SHARE = 8

MIB = 1 << 20


@dataclass(frozen=True)
class SiteCost:
    """Bytes a site costs: ``held`` per image while captured, ``work`` per image and ``fixed``
    (weight copies) while it is searched."""

    held: int
    work: int
    fixed: int = 0


@dataclass(frozen=True)
class PassCost:
    """Per image: the autograd graph of a gradient capture, and the largest activation."""

    graph: int
    activation: int
    image: int
    logits: int


@dataclass(frozen=True)
class Plan:
    """Capture groups (site names in model order), images per capture pass, search step bytes,
    and the peak bytes the plan allows for (at most the budget)."""

    groups: list[list[str]]
    capture_batch: int
    step_bytes: int
    peak_bytes: int


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _search_nbytes(t: torch.Tensor) -> int:
    """Bytes of ``t`` as the search holds it: widened to float32 (half-precision models)."""
    return t.numel() * max(4, t.element_size())


def _weight_copies(w: torch.Tensor) -> int:
    """The search's weight-sized tensors: |w| for Δ0, the fake-quantized blocks and their
    concatenation, plus the float32 copy of a half-precision weight."""
    return 3 * _search_nbytes(w) + (_search_nbytes(w) if w.element_size() < 4 else 0)


def _linear_cost(site: QuantLinear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor, with_grad: bool) -> int:
    x = _search_nbytes(inputs[0])
    # The fixed input while the weight is searched (fake-quantized: the quantizer says how many
    # copies that holds; an unquantized input counts as a uniform one), then the layer's float output.
    fixed_input = site.a_quant.search_bytes(x) if site.a_quant is not None else Quantizer.search_copies * x
    return max(fixed_input, x + _search_nbytes(output))


def _conv_cost(site: QuantConv2d, inputs: tuple[torch.Tensor, ...], output: torch.Tensor, with_grad: bool) -> int:
    kh, kw = site.kernel_size
    positions = output.numel() // output.shape[1]
    patches = inputs[0].shape[1] * kh * kw * positions * max(4, inputs[0].element_size())
    out = _search_nbytes(output)
    # Unfolded patches are copied once into rows; the gradient is copied into (rows, channels).
    return max(2 * patches, patches + out + (out if with_grad else 0))


def _matmul_cost(site: QuantMatMul, inputs: tuple[torch.Tensor, ...], output: torch.Tensor, with_grad: bool) -> int:
    a, b = _search_nbytes(inputs[0]), _search_nbytes(inputs[1])
    out = _search_nbytes(output)
    head_out = out // inputs[0].shape[1]
    # One head's product at a time, unless operand A's one parameter is scored over all heads at once.
    whole = site.a_quant.whole_operand_search
    return max(site.b_quant.search_bytes(b), b + (out if whole else head_out), site.a_quant.search_bytes(a), a + head_out)


#: Bytes per image a site's search works with, by site class (a new site class registers its own).
SITE_WORK: KindRegistry = KindRegistry("search memory of site")
SITE_WORK.register(QuantLinear, _linear_cost)
SITE_WORK.register(QuantConv2d, _conv_cost)
SITE_WORK.register(QuantMatMul, _matmul_cost)


def _site_cost(site: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor, with_grad: bool) -> SiteCost:
    work = SITE_WORK.find(site)
    if work is None:
        raise TypeError(f"not a quantization site: {type(site).__name__}")
    held = sum(_nbytes(t) for t in inputs) + (_nbytes(output) if with_grad else 0)
    # A half-precision capture is widened to float32 for the search, next to the capture itself.
    widened = [t for t in (*inputs, *((output,) if with_grad else ())) if t.element_size() < 4]
    widen = sum(_search_nbytes(t) for t in widened)
    weight = getattr(site, "weight", None)
    return SiteCost(held, widen + work(site, inputs, output, with_grad), _weight_copies(weight) if weight is not None else 0)


def measure_costs(model: nn.Module, images: torch.Tensor, sites: dict[str, nn.Module],
                  with_grad: bool) -> tuple[dict[str, SiteCost], PassCost]:
    """Per-image costs of every site and of a capture pass, measured on ``images[:1]``."""
    costs: dict[str, SiteCost] = {}
    largest = [0]

    def make_hook(name):
        def hook(module, inputs, output):
            costs[name] = _site_cost(module, inputs, output, with_grad)
            largest[0] = max(largest[0], _nbytes(output), *(_nbytes(t) for t in inputs))
        return hook

    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    own |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
            largest[0] = max(largest[0], storage.nbytes())
        return t

    handles = [m.register_forward_hook(make_hook(name)) for name, m in sites.items()]
    image = images[:1].detach().clone().requires_grad_(with_grad)
    try:
        with frozen_parameters(model), torch.set_grad_enabled(with_grad), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(image)
    finally:
        for h in handles:
            h.remove()
    return costs, PassCost(graph=sum(saved.values()), activation=largest[0], image=_nbytes(image),
                           logits=_nbytes(logits))


def _capture_peak(held: int, n_images: int, batch: int, pc: PassCost, with_grad: bool, workers: int = 1) -> int:
    """Captured data, plus ``workers`` passes of ``batch`` images in flight at once."""
    per_image = TRANSIENT_ACTIVATIONS * pc.activation + (pc.graph + pc.image if with_grad else 0)
    return held * n_images + workers * batch * per_image


def _search_peaks(group: list[SiteCost], n_images: int, step_bytes: int, workers: int = 1) -> int:
    """The largest of: the sites not yet started, plus the site starting now (its work), plus
    the ``workers - 1`` costliest earlier sites that may still be in flight (their captured
    data, work and weight copies), plus the steps (``step_bytes`` split among the workers)."""
    peak, remaining = 0, sum(c.held for c in group)
    earlier: list[int] = []
    for c in group:
        in_flight = sum(sorted(earlier, reverse=True)[:workers - 1])
        peak = max(peak, remaining * n_images + c.work * n_images + c.fixed + in_flight + 2 * step_bytes)
        remaining -= c.held
        earlier.append((c.held + c.work) * n_images + c.fixed)
    return peak


def plan(costs: dict[str, SiteCost], pass_cost: PassCost, n_images: int, budget: int, capture_batch: int,
         with_grad: bool, full_batch_targets: bool = False, workers: int = 1, reserved: int = 0) -> Plan:
    """Capture groups that keep calibration within ``budget`` bytes beyond the model and images.

    A capture pass takes ``capture_batch`` images, fewer where the ``workers`` passes in flight
    would take more than half the budget. ``full_batch_targets`` (``kl-official``): each capture starts with a float
    pass over all images, and the pass size is kept, since it sets that loss's scale.
    ``workers`` capture passes, then ``workers`` site searches, run side by side (:mod:`.run`).
    ``reserved`` bytes are held throughout (copies of the tensors calibration rewrites).
    Raises UserError when the budget is too small for even one site or one image.
    """
    step_bytes = min(SEARCH_CHUNK_BYTES, budget // STEP_SHARE)
    batch = max(1, min(capture_batch, n_images))
    per_pass_image = _capture_peak(0, n_images, 1, pass_cost, with_grad, workers)
    if not full_batch_targets:
        while batch > 1 and batch * per_pass_image > budget // 2:
            batch -= 1
    targets = (n_images * (TRANSIENT_ACTIVATIONS * pass_cost.activation + 2 * pass_cost.logits)
               if full_batch_targets else 0)

    def peak_of(group: list[str]) -> int:
        g = [costs[n] for n in group]
        return reserved + max(_capture_peak(sum(c.held for c in g), n_images, batch, pass_cost, with_grad, workers),
                              _search_peaks(g, n_images, step_bytes, workers), targets)

    groups: list[list[str]] = []
    peak = 0
    for name in costs:
        if groups and peak_of(groups[-1] + [name]) <= budget:
            groups[-1].append(name)
            continue
        alone = peak_of([name])
        if alone > budget:
            raise UserError(f"memory_budget of {budget / MIB:.1f} MiB is too small: calibrating site {name!r} on "
                            f"{n_images} images needs {alone / MIB:.1f} MiB; raise memory_budget or use fewer images")
        groups.append([name])
    for g in groups:
        peak = max(peak, peak_of(g))
    return Plan(groups, batch, step_bytes, peak)


def default_memory_budget(device: torch.device, cgroup_root: str = "/sys/fs/cgroup", proc_root: str = "/proc") -> int:
    """A quarter of the memory the device has free for this process (CPU: the smaller of the
    host's available memory and the container's cgroup headroom), at least 512 MiB where
    that is at most half of it."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        avail: Optional[int] = available_memory(cgroup_root, proc_root)
        free = avail if avail is not None else 8 << 30
    return max(int(free // 4), min(512 * MIB, int(free // 2)))


__all__ = ["SiteCost", "PassCost", "Plan", "measure_costs", "plan", "default_memory_budget"]

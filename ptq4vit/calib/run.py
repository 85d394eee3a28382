"""Calibrate every site of a model: plan memory, then per capture group capture and search, on workers side by side."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..recipes import Recipe, get_recipe
from ..recipes.flat import Preset
from .budget import Plan, measure_costs, plan
from .calibrate import calibrate_site
from .capture import capture
from .resources import usable_cpus

log = logging.getLogger(__name__)


@contextmanager
def intra_op_threads(n: Optional[int]) -> Iterator[int]:
    """Run the block with ``n`` intra-op threads (None: leave torch's setting), then restore it."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield before
        return
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def default_workers(device: torch.device) -> int:
    """Calibration's workers (capture passes, then site searches, side by side, one intra-op
    thread each): one per CPU the process may use (its affinity and cgroup CPU quota, capped by
    torch's thread count); one on other devices, whose kernels run asynchronously to the host."""
    if device.type != "cpu":
        return 1
    return max(1, min(usable_cpus(), torch.get_num_threads()))


def search_group(sites: dict[str, nn.Module], data: dict, names: list[str], recipe: Recipe, step_bytes: int,
                 workers: int, bar) -> None:
    """Search the scales of the sites ``names`` from their captured ``data`` (popped as each starts).

    With ``workers`` > 1 the sites are searched side by side, each on one intra-op thread.
    Captured sites are independent, so a worker never waits for another. One site searched
    on several intra-op threads instead runs thousands of parallel regions of a few
    milliseconds, each ending at a barrier that waits for its slowest thread: on a busy machine
    that is a thread the scheduler has put behind another job, and calibration slowed far more
    than its CPU share shrank (docs/method.md §9). Each worker's search steps take
    ``step_bytes / workers``; :func:`.budget.plan` counts the sites in flight together.
    """
    def one(n: str, budget: int) -> None:
        site_data = data.pop(n)
        calibrate_site(sites[n], site_data.inputs, site_data.grad, recipe, budget)
        del site_data  # frees the site's captured data before the next site's search
        bar.update()

    if workers <= 1 or len(names) == 1:
        for n in names:
            bar.set_postfix_str(n, refresh=False)
            one(n, step_bytes)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="ptq4vit-search") as pool:
        futures = [pool.submit(one, n, step_bytes // workers) for n in names]
        try:
            for f in futures:
                f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _own_tensors(site: nn.Module) -> dict[str, torch.Tensor]:
    """The site's own float tensors (weight, bias, smoothing divisor), not its quantizers' scales."""
    own = dict(site.named_parameters(recurse=False))
    own.update(site.named_buffers(recurse=False))
    return {k: t for k, t in own.items() if t is not None}


def _copy_own_tensors(site: nn.Module) -> dict[str, torch.Tensor]:
    return {k: t.detach().clone() for k, t in _own_tensors(site).items()}


def _swap_own_tensors(site: nn.Module, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write ``values`` into the site's own tensors; return copies of what they held."""
    held = _copy_own_tensors(site)
    with torch.no_grad():
        for k, t in _own_tensors(site).items():
            t.copy_(values[k])
    return held


def rewrites_sites(recipe: Recipe) -> bool:
    """Whether calibration rewrites sites' float tensors (GPTQ-rounded weights, smoothing, corrected
    biases), so that capture passes after the first must be shown the float ones (:func:`calibrate_model`)."""
    return (recipe.weights.rounding.variant == "gptq" or recipe.transform("smoothing") is not None
            or recipe.transform("bias_correction") is not None)


def make_plan(model: nn.Module, images: torch.Tensor, sites: dict[str, nn.Module], recipe: Recipe, budget: int,
              capture_batch: int, workers: int = 1) -> Plan:
    grad_source = recipe.calibration.gradient_source()
    costs, pass_cost = measure_costs(model, images, sites, with_grad=grad_source is not None)
    kl = grad_source == "kl-official"
    # Sites that calibration rewrites keep two copies of their own tensors until it ends (calibrate_model).
    reserved = 2 * sum(t.numel() * t.element_size() for s in sites.values() for t in _own_tensors(s).values()) \
        if rewrites_sites(recipe) else 0
    return plan(costs, pass_cost, len(images), budget, recipe.calibration.gradient_chunk() if kl else capture_batch,
                with_grad=grad_source is not None, full_batch_targets=kl, workers=workers, reserved=reserved)


def calibrate_model(model: nn.Module, images: torch.Tensor, sites: dict[str, nn.Module], recipe: "Recipe | Preset",
                    budget: int, capture_batch: int, threads: Optional[int] = None, progress: bool = True,
                    desc: str = "calibrating") -> Plan:
    """Choose the scales of every site of ``model`` (its quantizers disabled) on ``images``.

    What calibration allocates beyond the model and ``images`` stays within ``budget`` bytes
    (see :mod:`.budget`). ``threads`` workers (default :func:`default_workers`) run the capture
    passes, then the site searches, side by side, each on one intra-op thread; torch's setting
    is restored afterwards. Every pass and every search runs on one thread whatever the number
    of workers, so the scales do not depend on it. Where the recipe rewrites sites' float tensors
    (GPTQ, smoothing, bias correction) and the budget needs several capture passes, each group's
    rewritten tensors are set aside and its float ones put back until the last pass, so every pass
    sees the float model and the result does not depend on the budget. Returns the plan it followed.
    ``recipe``'s calibration is a grid search (a flat :class:`Preset` is read as the recipe it means).
    """
    recipe = get_recipe(recipe)
    grad_source = recipe.calibration.gradient_source()
    workers = threads if threads is not None else default_workers(images.device)
    with intra_op_threads(1):
        p = make_plan(model, images, sites, recipe, budget, capture_batch, workers)
        if p.capture_batch < min(capture_batch, len(images)) and grad_source != "kl-official":
            log.info("capture passes of %d images (not %d) fit the memory budget", p.capture_batch, capture_batch)
        elif p.capture_batch < capture_batch and grad_source != "kl-official":
            log.debug("capture passes of %d images: the calibration set holds no more (capture_batch=%d)",
                      p.capture_batch, capture_batch)
        log.debug("%d capture group(s), search steps of %d bytes, planned peak %d bytes, %d worker(s)",
                  len(p.groups), p.step_bytes, p.peak_bytes, workers)
        bar = tqdm(total=len(sites), desc=desc, unit="layer", disable=not progress)
        set_aside: dict[str, dict[str, torch.Tensor]] = {}
        for i, group in enumerate(p.groups):
            data = capture(model, images, {n: sites[n] for n in group}, grad_source, p.capture_batch,
                           recipe.calibration.gradient_chunk(), workers)
            later_passes = rewrites_sites(recipe) and i < len(p.groups) - 1
            floats = {n: _copy_own_tensors(sites[n]) for n in group} if later_passes else {}
            search_group(sites, data, group, recipe, p.step_bytes, workers, bar)
            del data
            for n in group if later_passes else ():
                set_aside[n] = _swap_own_tensors(sites[n], floats.pop(n))
        for n, values in set_aside.items():
            _swap_own_tensors(sites[n], values)
        bar.close()
    return p


__all__ = ["calibrate_model", "default_workers", "intra_op_threads", "make_plan", "search_group"]

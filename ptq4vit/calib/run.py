"""Calibrate every site of a model: plan memory, capture group by group, search site by site."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..presets import Preset
from .budget import Plan, measure_costs, plan
from .calibrate import calibrate_site
from .capture import capture
from .resources import free_cpus, usable_cpus

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


def capture_threads(device: torch.device) -> Optional[int]:
    """Intra-op threads for the capture passes: torch's count, capped by the CPUs the process
    may use (affinity and cgroup quota), which do not change while it runs. Fixed, because
    the ``kl-official`` gradients are rounding noise that changes with the thread count
    (tiny Swin, ``official`` preset: 1 and 2 threads choose different scales)."""
    if device.type != "cpu":
        return None
    n = min(usable_cpus(), torch.get_num_threads())
    return n if n != torch.get_num_threads() else None


def search_threads(device: torch.device) -> Optional[int]:
    """Intra-op threads for the scale search: as :func:`capture_threads`, less the CPUs other
    runnable tasks occupy when calibration starts (None where that changes nothing).

    The search runs thousands of parallel regions of a few milliseconds each; every region
    ends at a barrier that waits for its slowest thread. With other jobs on the cores, a thread
    waits there for a time slice each time: calibration slowed ~65x where a fair share of the
    CPU would give ~5x (issue 8 item 11). A thread per free CPU (one, on a saturated machine)
    does not wait at barriers. The search chose the same scales with 1 and 2 threads in every
    case tested (tests/test_budget.py).
    """
    if device.type != "cpu":
        return None
    n = min(free_cpus(), torch.get_num_threads())
    return n if n != torch.get_num_threads() else None


def make_plan(model: nn.Module, images: torch.Tensor, sites: dict[str, nn.Module], preset: Preset, budget: int,
              capture_batch: int) -> Plan:
    grad_source = preset.gradients
    costs, pass_cost = measure_costs(model, images, sites, with_grad=grad_source is not None)
    kl = grad_source == "kl-official"
    return plan(costs, pass_cost, len(images), budget, preset.grad_chunk if kl else capture_batch,
                with_grad=grad_source is not None, full_batch_targets=kl)


def calibrate_model(model: nn.Module, images: torch.Tensor, sites: dict[str, nn.Module], preset: Preset,
                    budget: int, capture_batch: int, threads: Optional[int] = None, progress: bool = True,
                    desc: str = "calibrating") -> Plan:
    """Choose the scales of every site of ``model`` (its quantizers disabled) on ``images``.

    What calibration allocates beyond the model and ``images`` stays within ``budget`` bytes
    (see :mod:`.budget`). ``threads`` intra-op threads are used throughout (default:
    :func:`capture_threads` for capture passes, :func:`search_threads` for the search);
    torch's setting is restored afterwards. Returns the plan it followed.
    """
    grad_source = preset.gradients
    device = images.device
    for_capture = threads if threads is not None else capture_threads(device)
    for_search = threads if threads is not None else search_threads(device)
    with intra_op_threads(for_capture):
        p = make_plan(model, images, sites, preset, budget, capture_batch)
    if p.capture_batch < capture_batch and grad_source != "kl-official":
        log.info("capture passes of %d images (not %d) fit the memory budget", p.capture_batch, capture_batch)
    log.debug("%d capture group(s), search steps of %d bytes, planned peak %d bytes, threads %s/%s",
              len(p.groups), p.step_bytes, p.peak_bytes, for_capture, for_search)
    bar = tqdm(total=len(sites), desc=desc, unit="layer", disable=not progress)
    for group in p.groups:
        with intra_op_threads(for_capture):
            data = capture(model, images, {n: sites[n] for n in group}, grad_source, p.capture_batch, preset.grad_chunk)
        with intra_op_threads(for_search):
            for n in group:
                bar.set_postfix_str(n, refresh=False)
                site_data = data.pop(n)
                calibrate_site(sites[n], site_data.inputs, site_data.grad, preset, p.step_bytes)
                del site_data  # frees the site's captured data before the next site's search
                bar.update()
        del data
    bar.close()
    return p


__all__ = ["calibrate_model", "capture_threads", "intra_op_threads", "make_plan", "search_threads"]

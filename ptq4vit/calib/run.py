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
from .resources import free_cpus

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


def default_threads(device: torch.device) -> Optional[int]:
    """Intra-op threads for calibrating on ``device``: torch's count, capped by the CPUs free for
    this process when calibration starts (None where that changes nothing, or off the CPU).

    The search runs thousands of parallel regions of a few milliseconds each; every region
    ends at a barrier that waits for its slowest thread. With other jobs on the cores, a thread
    waits there for a time slice (milliseconds) each time, and calibration slowed ~65x where a
    fair share would give ~5x (issue 8 item 11). A thread per free CPU (one, on a saturated
    machine) never waits at a barrier, so calibration slows no more than its share of the CPU
    shrinks. The scales do not depend on the thread count (tests/test_budget.py).
    """
    if device.type != "cpu":
        return None
    n = min(free_cpus(), torch.get_num_threads())
    return n if n != torch.get_num_threads() else None


def make_plan(model: nn.Module, images: torch.Tensor, sites: dict[str, nn.Module], preset: Preset, budget: int,
              capture_batch: int) -> Plan:
    grad_source = preset.grad_source if preset.metric == "hessian" else None
    costs, pass_cost = measure_costs(model, images, sites, with_grad=grad_source is not None)
    kl = grad_source == "kl-official"
    return plan(costs, pass_cost, len(images), budget, preset.grad_chunk if kl else capture_batch,
                with_grad=grad_source is not None, full_batch_targets=kl)


def calibrate_model(model: nn.Module, images: torch.Tensor, sites: dict[str, nn.Module], preset: Preset,
                    budget: int, capture_batch: int, threads: Optional[int] = None, progress: bool = True,
                    desc: str = "calibrating") -> Plan:
    """Choose the scales of every site of ``model`` (its quantizers disabled) on ``images``.

    What calibration allocates beyond the model and ``images`` stays within ``budget`` bytes
    (see :mod:`.budget`); ``threads`` intra-op threads are used and torch's setting is restored.
    Returns the plan it followed.
    """
    grad_source = preset.grad_source if preset.metric == "hessian" else None
    with intra_op_threads(threads):
        p = make_plan(model, images, sites, preset, budget, capture_batch)
        log.debug("calibrating with %d intra-op threads", torch.get_num_threads())
        if p.capture_batch < capture_batch and grad_source != "kl-official":
            log.info("capture passes of %d images (not %d) fit the memory budget", p.capture_batch, capture_batch)
        log.debug("%d capture group(s), search steps of %d bytes, planned peak %d bytes",
                  len(p.groups), p.step_bytes, p.peak_bytes)
        bar = tqdm(total=len(sites), desc=desc, unit="layer", disable=not progress)
        for group in p.groups:
            data = capture(model, images, {n: sites[n] for n in group}, grad_source, p.capture_batch, preset.grad_chunk)
            for n in group:
                bar.set_postfix_str(n, refresh=False)
                site_data = data.pop(n)
                calibrate_site(sites[n], site_data.inputs, site_data.grad, preset, p.step_bytes)
                del site_data  # frees the site's captured data before the next site's search
                bar.update()
            del data
        bar.close()
    return p


__all__ = ["calibrate_model", "default_threads", "intra_op_threads", "make_plan"]

"""Capture what calibration needs: every site's float inputs and output gradients.

All sites are float while capturing (docs/method.md §2: each layer is calibrated on full-precision
inputs), so one forward pass and one backward pass give every site's data at once, instead
of one network pass per layer. Sites are processed in groups that fit a memory budget; a
small model is a single group.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..finite import nonfinite_count


class SiteData:
    """Inputs of one site over the calibration set, and the gradient of its output (or None).

    Each pass's tensors are copied into tensors sized for the whole set, at the rows of the
    pass's images, so the captured data exists once (no list of pieces and concatenated copy
    side by side) and passes may arrive in any order. ``n_images`` sizes them: a tensor whose
    leading dim holds ``r`` rows per image (Swin windows) gets ``r * n_images`` rows.
    """

    def __init__(self, n_images: int):
        self.n_images = n_images
        self.inputs: list[torch.Tensor] = []
        self.grad: Optional[torch.Tensor] = None
        self._allocating = threading.Lock()  # passes on several workers reach a site at once

    def _dest(self, dest: Optional[torch.Tensor], t: torch.Tensor, images: int) -> tuple[torch.Tensor, int]:
        rows_per_image, rest = divmod(t.shape[0], images)
        if rest:
            raise ValueError(f"a captured tensor of {t.shape[0]} rows does not split into {images} images")
        if dest is None:
            dest = t.new_empty((rows_per_image * self.n_images, *t.shape[1:]))
        return dest, rows_per_image

    def add_inputs(self, tensors: tuple[torch.Tensor, ...], first_image: int, images: int) -> None:
        with self._allocating:
            if not self.inputs:
                self.inputs = [self._dest(None, t, images)[0] for t in tensors]
            dests = list(self.inputs)
        for dest, t in zip(dests, tensors):
            rows = self._dest(dest, t, images)[1]
            dest[first_image * rows:first_image * rows + t.shape[0]].copy_(t)

    def add_grad(self, g: torch.Tensor, first_image: int, images: int) -> None:
        with self._allocating:
            self.grad, rows = self._dest(self.grad, g, images)
        self.grad[first_image * rows:first_image * rows + g.shape[0]].copy_(g)


class _Pass(threading.local):
    """The images of the pass the current thread runs: where its hooks put what they see."""

    first_image = 0
    images = 0


@contextmanager
def _hooks(sites: dict[str, nn.Module], data: dict[str, SiteData], current: _Pass, with_grad: bool) -> Iterator[None]:
    """Copy each site's inputs (and output gradient) into ``data`` at the rows of ``current``'s images."""
    def make_hook(name):
        def hook(module, inputs, output):
            first, n = current.first_image, current.images
            data[name].add_inputs(tuple(t.detach() for t in inputs), first, n)
            if with_grad and output.requires_grad:
                output.register_hook(lambda g: data[name].add_grad(g.detach(), first, n))
        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in sites.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring gradients: a capture pass needs activation gradients only.

    Weight gradients would cost a model-sized ``.grad`` per parameter (left behind on the
    model, too) and a third of the backward pass; the activation gradients are the same ops
    either way.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def capture(model: nn.Module, images: torch.Tensor, sites: dict[str, nn.Module], grad_source: Optional[str],
            batch_size: int, grad_chunk: int = 4, workers: int = 1) -> dict[str, SiteData]:
    """Run the float model over ``images`` and return the captured data of ``sites``.

    ``grad_source``: ``None`` (no gradients), ``"ce-fp-label"`` (cross-entropy against the
    float model's own argmax labels, summed so that chunking does not rescale images) or
    ``"kl-official"`` (the released code: ``kl_div(log_softmax(pred), p, "batchmean")`` over
    chunks of ``grad_chunk`` images with ``p`` from one full-batch float pass; since ``pred``
    equals the float output the loss is zero and ``g`` is rounding noise, reproduced as is).
    Passes are independent, so ``workers`` threads run them side by side; what each captures
    does not depend on which thread runs it.
    """
    data = {name: SiteData(len(images)) for name in sites}
    target = None
    if grad_source == "kl-official":
        with torch.no_grad():
            target = F.softmax(model(images), dim=-1)
        batch_size = grad_chunk
    elif grad_source not in (None, "ce-fp-label"):
        raise ValueError(f"unknown gradient source {grad_source!r}")
    current = _Pass()

    def one_pass(start: int) -> None:
        chunk = images[start:start + batch_size]
        current.first_image, current.images = start, len(chunk)
        if grad_source is None:
            with torch.no_grad():
                model(chunk)
            return
        chunk = chunk.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model(chunk)
            if grad_source == "ce-fp-label":
                loss = F.cross_entropy(logits, logits.detach().argmax(-1), reduction="sum")
            else:
                loss = F.kl_div(F.log_softmax(logits, dim=-1), target[start:start + batch_size], reduction="batchmean")
            loss.backward()

    starts = range(0, len(images), batch_size)
    with frozen_parameters(model), _hooks(sites, data, current, with_grad=grad_source is not None):
        if workers <= 1 or len(starts) == 1:
            for start in starts:
                one_pass(start)
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="ptq4vit-capture") as pool:
                for f in [pool.submit(one_pass, start) for start in starts]:
                    f.result()
    _check_finite(data)
    return data


def _check_finite(data: dict[str, SiteData]) -> None:
    """Refuse captured data that is not finite: the search would turn it into NaN scales (or fail on it).
    Inputs first, in model order: where the forward pass first overflows is the cause of the rest."""
    inputs = [(name, f"input {i}" if len(d.inputs) > 1 else "input", t)
              for name, d in data.items() for i, t in enumerate(d.inputs)]
    grads = [(name, "output gradient", d.grad) for name, d in data.items() if d.grad is not None]
    for name, what, t in inputs + grads:
        bad = nonfinite_count(t)
        if bad:
            raise UserError(f"the float model's {what} at site {name!r} has {bad} of {t.numel()} values that are "
                            f"not finite (NaN or inf) on the calibration images: it overflows on them; check the "
                            f"images' range and the model's weights")


__all__ = ["SiteData", "capture", "frozen_parameters"]

"""Capture what calibration needs: every site's float inputs and output gradients.

All sites are float while capturing (docs/method.md §2: each layer is calibrated on full-precision
inputs), so one forward pass and one backward pass give every site's data at once, instead
of one network pass per layer. Sites are processed in groups that fit a memory budget; a
small model is a single group.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn


class SiteData:
    """Inputs of one site over the calibration set, and the gradient of its output (or None).

    Each pass's tensors are copied into tensors sized for the whole set when the first pass
    arrives, so the captured data exists once: no list of pieces and concatenated copy side
    by side. ``n_images`` sizes them: a tensor whose leading dim holds ``r`` rows per image
    (Swin windows) gets ``r * n_images`` rows.
    """

    def __init__(self, n_images: int):
        self.n_images = n_images
        self.inputs: list[torch.Tensor] = []
        self.grad: Optional[torch.Tensor] = None
        self._filled = 0
        self._grad_filled = 0

    def _place(self, dest: Optional[torch.Tensor], t: torch.Tensor, images_before: int, images: int) -> torch.Tensor:
        rows_per_image, rest = divmod(t.shape[0], images)
        if rest:
            raise ValueError(f"a captured tensor of {t.shape[0]} rows does not split into {images} images")
        if dest is None:
            dest = t.new_empty((rows_per_image * self.n_images, *t.shape[1:]))
        row = images_before * rows_per_image
        dest[row:row + t.shape[0]].copy_(t)
        return dest

    def add_inputs(self, tensors: tuple[torch.Tensor, ...], images: int) -> None:
        dests = self.inputs or [None] * len(tensors)
        self.inputs = [self._place(d, t, self._filled, images) for d, t in zip(dests, tensors)]
        self._filled += images

    def add_grad(self, g: torch.Tensor, images: int) -> None:
        # Backward visits passes in forward order, so the gradients line up with the inputs.
        self.grad = self._place(self.grad, g, self._grad_filled, images)
        self._grad_filled += images


@contextmanager
def _hooks(sites: dict[str, nn.Module], data: dict[str, SiteData], images: list[int], with_grad: bool) -> Iterator[None]:
    """Copy each site's inputs (and output gradient) into ``data``; ``images[0]`` is the pass's image count."""
    def make_hook(name):
        def hook(module, inputs, output):
            n = images[0]
            data[name].add_inputs(tuple(t.detach() for t in inputs), n)
            if with_grad and output.requires_grad:
                output.register_hook(lambda g: data[name].add_grad(g.detach(), n))
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
            batch_size: int, grad_chunk: int = 4) -> dict[str, SiteData]:
    """Run the float model over ``images`` and return the captured data of ``sites``.

    ``grad_source``: ``None`` (no gradients), ``"ce-fp-label"`` (cross-entropy against the
    float model's own argmax labels, summed so that chunking does not rescale images) or
    ``"kl-official"`` (the released code: ``kl_div(log_softmax(pred), p, "batchmean")`` over
    chunks of ``grad_chunk`` images with ``p`` from one full-batch float pass; since ``pred``
    equals the float output the loss is zero and ``g`` is rounding noise, reproduced as is).
    """
    data = {name: SiteData(len(images)) for name in sites}
    if grad_source == "kl-official":
        with torch.no_grad():
            target = F.softmax(model(images), dim=-1)
        batch_size = grad_chunk
    pass_images = [0]
    with frozen_parameters(model):
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            pass_images[0] = len(chunk)
            if grad_source is None:
                with torch.no_grad(), _hooks(sites, data, pass_images, with_grad=False):
                    model(chunk)
                continue
            chunk = chunk.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                with _hooks(sites, data, pass_images, with_grad=True):
                    logits = model(chunk)
                if grad_source == "ce-fp-label":
                    loss = F.cross_entropy(logits, logits.detach().argmax(-1), reduction="sum")
                elif grad_source == "kl-official":
                    loss = F.kl_div(F.log_softmax(logits, dim=-1), target[start:start + batch_size], reduction="batchmean")
                else:
                    raise ValueError(f"unknown gradient source {grad_source!r}")
                loss.backward()
            del logits, loss, chunk
    return data


__all__ = ["SiteData", "capture", "frozen_parameters"]

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

from ..nn import QuantMatMul


class SiteData:
    """Inputs of one site over the calibration set, and the gradient of its output (or None)."""

    def __init__(self):
        self._inputs: list[list[torch.Tensor]] = []
        self._grads: list[torch.Tensor] = []

    @property
    def inputs(self) -> list[torch.Tensor]:
        return [torch.cat(parts) for parts in zip(*self._inputs)]

    @property
    def grad(self) -> Optional[torch.Tensor]:
        # Backward visits chunks in forward order, so the gradients line up with the inputs.
        return torch.cat(self._grads) if self._grads else None


@contextmanager
def _hooks(sites: dict[str, nn.Module], data: dict[str, SiteData], with_grad: bool) -> Iterator[None]:
    def make_hook(name):
        def hook(module, inputs, output):
            data[name]._inputs.append([t.detach() for t in inputs])
            if with_grad and output.requires_grad:
                output.register_hook(lambda g: data[name]._grads.append(g.detach()))
        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in sites.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def capture(model: nn.Module, images: torch.Tensor, sites: dict[str, nn.Module], grad_source: Optional[str],
            batch_size: int, grad_chunk: int = 4) -> dict[str, SiteData]:
    """Run the float model over ``images`` and return the captured data of ``sites``.

    ``grad_source``: ``None`` (no gradients), ``"ce-fp-label"`` (cross-entropy against the
    float model's own argmax labels, summed so that chunking does not rescale images) or
    ``"kl-official"`` (the released code: ``kl_div(log_softmax(pred), p, "batchmean")`` over
    chunks of ``grad_chunk`` images with ``p`` from one full-batch float pass; since ``pred``
    equals the float output the loss is zero and ``g`` is rounding noise, reproduced as is).
    """
    data = {name: SiteData() for name in sites}
    if grad_source == "kl-official":
        with torch.no_grad():
            target = F.softmax(model(images), dim=-1)
        batch_size = grad_chunk
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        if grad_source is None:
            with torch.no_grad(), _hooks(sites, data, with_grad=False):
                model(chunk)
            continue
        chunk = chunk.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            with _hooks(sites, data, with_grad=True):
                logits = model(chunk)
            if grad_source == "ce-fp-label":
                loss = F.cross_entropy(logits, logits.detach().argmax(-1), reduction="sum")
            elif grad_source == "kl-official":
                loss = F.kl_div(F.log_softmax(logits, dim=-1), target[start:start + batch_size], reduction="batchmean")
            else:
                raise ValueError(f"unknown gradient source {grad_source!r}")
            loss.backward()
    return data


def estimate_site_bytes(model: nn.Module, image: torch.Tensor, sites: dict[str, nn.Module], with_grad: bool) -> dict[str, int]:
    """Bytes each site's capture takes per image, measured on one image."""
    sizes: dict[str, int] = {}

    def make_hook(name):
        def hook(module, inputs, output):
            n = sum(t.numel() * t.element_size() for t in inputs)
            if with_grad:
                n += output.numel() * output.element_size()
            # Matmul operands feed a float output that the search recomputes too.
            if isinstance(module, QuantMatMul):
                n += output.numel() * output.element_size()
            sizes[name] = n
        return hook

    handles = [m.register_forward_hook(make_hook(name)) for name, m in sites.items()]
    try:
        with torch.no_grad():
            model(image[:1])
    finally:
        for h in handles:
            h.remove()
    return sizes


def plan_groups(site_bytes: dict[str, int], n_images: int, budget_bytes: int) -> list[list[str]]:
    """Split sites, in model order, into groups whose captures fit ``budget_bytes``."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, per_image in site_bytes.items():
        need = per_image * n_images
        if groups[-1] and used + need > budget_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += need
    return groups


def default_memory_budget(device: torch.device) -> int:
    """A quarter of the free memory of ``device`` (at least 512 MiB)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            import os
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 8 << 30
    return max(512 << 20, int(free // 4))


__all__ = ["SiteData", "capture", "estimate_site_bytes", "plan_groups", "default_memory_budget"]

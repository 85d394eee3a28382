"""Top-1 evaluation, single-process or sharded over ``torchrun`` processes.

Under ``torch.distributed`` (initialised by :func:`init_distributed` when launched with
``torchrun``) each rank evaluates the strided shard ``rank::world_size`` of the dataset; the
counts are summed with ``all_reduce`` and the per-image predictions gathered, so the result is
exactly the single-process one (every image counted once, counts add up to the dataset size).
On CPU the ``gloo`` backend is used, on GPUs ``nccl``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .data import make_loader


@dataclass
class EvalResult:
    correct: int
    total: int                     # images evaluated (readable ones)
    skipped: int = 0               # unreadable images left out
    skipped_paths: list = field(default_factory=list)
    seconds: float = 0.0
    world_size: int = 1
    #: Predicted class per dataset index (-1 for skipped images), when asked for.
    predictions: Optional[list] = None
    #: Float32 logits ``(n, classes)`` in dataset order (NaN rows for skipped images), when asked for.
    logits: Optional[torch.Tensor] = None

    @property
    def top1(self) -> float:
        return 100.0 * self.correct / self.total if self.total else float("nan")


# --------------------------------------------------------------------------- distributed set-up


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return dist_info()[0] == 0


def init_distributed(device: str = "auto") -> torch.device:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1) and pick this rank's device.

    ``device``: ``"auto"`` (this rank's GPU if any, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    The backend is ``nccl`` for GPUs and ``gloo`` for CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device in (None, "auto"):
        dev = torch.device(f"cuda:{local_rank % torch.cuda.device_count()}") if torch.cuda.is_available() \
            else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local_rank % max(1, torch.cuda.device_count())}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dev


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --------------------------------------------------------------------------- evaluation


def device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, dataset, *, batch_size: int = 64, num_workers: int = 0,
             device: Optional[torch.device] = None, progress: bool = True, desc: str = "eval",
             return_predictions: bool = False, return_logits: bool = False) -> EvalResult:
    """Top-1 accuracy of ``model`` over ``dataset`` (items ``(image, label, index)``, see :mod:`ptq4vit.data`).

    Sharded across the process group when one is initialised; every rank gets the same result.
    """
    rank, world = dist_info()
    device = device or device_of(model)
    model.eval()
    n = len(dataset)
    shard = list(range(rank, n, world))
    loader = make_loader(dataset, batch_size=batch_size, num_workers=num_workers, indices=shard,
                         pin_memory=device.type == "cuda")
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(shard), desc=desc + (f" [rank 0 of {world}]" if world > 1 else ""),
                   unit="img", dynamic_ncols=True)
    correct = total = 0
    skipped: list[int] = []
    idx_out: list[int] = []
    pred_out: list[int] = []
    logit_idx: list[torch.Tensor] = []
    logit_out: list[torch.Tensor] = []
    t0 = time.perf_counter()
    for batch in loader:
        skipped.extend(batch.skipped)
        if batch.images is not None:
            logits = model(batch.images.to(device, non_blocking=True))
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            pred = logits.argmax(dim=-1).cpu()
            correct += int((pred == batch.labels).sum())
            total += len(batch)
            if return_predictions:
                idx_out.extend(batch.indices.tolist())
                pred_out.extend(pred.tolist())
            if return_logits:
                logit_idx.append(batch.indices.clone())
                logit_out.append(logits.detach().float().cpu())
        if bar is not None:
            bar.update(len(batch) + len(batch.skipped))
            bar.set_postfix(top1=f"{100.0 * correct / max(total, 1):.2f}%", refresh=False)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0

    if world > 1:
        backend = dist.get_backend()
        cdev = device if backend == "nccl" else torch.device("cpu")
        counts = torch.tensor([correct, total, len(skipped)], dtype=torch.long, device=cdev)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        correct, total, n_skipped = (int(v) for v in counts.cpu())
        gathered = [None] * world
        dist.all_gather_object(gathered, (skipped, idx_out, pred_out, seconds))
        skipped = sorted(i for g in gathered for i in g[0])
        seconds = max(g[3] for g in gathered)
        if return_predictions:
            idx_out = [i for g in gathered for i in g[1]]
            pred_out = [p for g in gathered for p in g[2]]
        if return_logits:
            parts = [None] * world
            dist.all_gather_object(parts, (logit_idx, logit_out))
            logit_idx = [t for g in parts for t in g[0]]
            logit_out = [t for g in parts for t in g[1]]
        assert n_skipped == len(skipped) and total + n_skipped == n, "shards do not add up to the dataset"
    predictions = None
    if return_predictions:
        predictions = [-1] * n
        for i, p in zip(idx_out, pred_out):
            predictions[i] = p
    all_logits = None
    if return_logits and logit_out:
        all_logits = torch.full((n, logit_out[0].shape[-1]), float("nan"))
        all_logits[torch.cat(logit_idx)] = torch.cat(logit_out)
    paths = [dataset.samples[i][0] for i in skipped] if hasattr(dataset, "samples") else [str(i) for i in skipped]
    return EvalResult(correct=correct, total=total, skipped=len(skipped), skipped_paths=paths,
                      seconds=seconds, world_size=world, predictions=predictions, logits=all_logits)

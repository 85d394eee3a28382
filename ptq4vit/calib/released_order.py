"""Cosine scores reduced as the released PTQ4ViT code reduces them (docs/method.md §2).

The score of a candidate is a float32 sum of tens of thousands of per-row cosines, and
neighbouring candidates often differ by less than that sum's rounding: which of two near-tied
candidates wins then depends on the order of the additions. A float32 reduction's order in
PyTorch depends on the shape and layout of the tensor it reduces (an outer reduction's result
for one column changes with the number of columns beside it), so each function here lays the
per-row cosines out as the released code holds them and makes its calls: the mean over a
layer's tokens, the sum over images, with the candidates cut into the steps (and the images
into the batches) its memory rule gives. Each takes the rows' cosines from
:func:`ptq4vit.calib.search.row_scores`, which computes them as ``F.cosine_similarity`` does.
"""
from __future__ import annotations

import torch

#: The released code's rule for candidates per step: as many as fit this many float32 values
#: (3 GiB) next to its copies of a layer's data; the patch embedding's conv allows 15 GiB.
_BUDGET = 3 * 1024 * 1024 * 1024 / 4
_CONV_BUDGET = 15 * 1024 * 1024 * 1024 / 4


def _steps(images: int, floats_per_image: float, budget: float) -> tuple[int, int]:
    """(candidates per step, images per batch) as the released code chooses them: the images
    are halved until at least two candidates fit."""
    batch = images
    while True:
        step = int(budget // (floats_per_image * batch))
        if step > 1 or batch <= 1:
            return max(1, step), batch
        batch //= 2


def _spans(total: int, step: int):
    return [(i, min(total, i + step)) for i in range(0, total, step)]


def linear_scores(cos: torch.Tensor, floats_per_image: int) -> torch.Tensor:
    """Scores ``(n, G)`` of a linear layer's candidates from ``cos: (G, n, images, tokens)``.

    ``G`` is the number of weight groups searched together (3 for a qkv weight, each scored on
    its own output columns; 1 for the input). The released code holds ``(images, tokens, n, G)``,
    takes the mean over tokens, then sums over images, per step and batch.
    ``floats_per_image``: one image's input and output values (tokens x (in + out features)).
    """
    n, images = cos.shape[1], cos.shape[2]
    step, batch = _steps(images, 2 * floats_per_image, _BUDGET)
    per_batch = []
    for b0, b1 in _spans(images, batch):
        per_step = [cos[:, p0:p1, b0:b1].permute(2, 3, 1, 0).contiguous()   # (b, tokens, p, G)
                    .mean(dim=1).sum(dim=0, keepdim=True)                   # (1, p, G)
                    for p0, p1 in _spans(n, step)]
        per_batch.append(torch.cat(per_step, dim=1))
    return torch.cat(per_batch, dim=0).sum(dim=0)


def conv_scores(cos: torch.Tensor, floats_per_image: int) -> torch.Tensor:
    """Scores ``(n, channels)`` of per-channel conv weight candidates from ``cos: (n, images,
    channels)`` (each channel's cosine over its positions in one image): held as ``(images, n,
    channels)`` and summed over images. ``floats_per_image``: one image's input and output values."""
    n, images = cos.shape[0], cos.shape[1]
    step, batch = _steps(images, 2 * floats_per_image, _CONV_BUDGET)
    per_batch = []
    for b0, b1 in _spans(images, batch):
        per_step = [cos[p0:p1, b0:b1].transpose(0, 1).contiguous().sum(dim=0, keepdim=True)   # (1, p, channels)
                    for p0, p1 in _spans(n, step)]
        per_batch.append(torch.cat(per_step, dim=1))
    return torch.cat(per_batch, dim=0).sum(dim=0)


def matmul_scores(cos: torch.Tensor, floats_per_image: int) -> torch.Tensor:
    """Scores ``(n, heads)`` of per-head attention-operand candidates from ``cos: (heads, n,
    images, rows)``: held as ``(n, images, heads, rows)``, the mean over rows, the sum over
    images. ``floats_per_image``: one image's values of both operands and twice the output."""
    n, images = cos.shape[1], cos.shape[2]
    step, batch = _steps(images, floats_per_image, _BUDGET)
    per_batch = []
    for b0, b1 in _spans(images, batch):
        per_step = [cos[:, p0:p1, b0:b1].permute(1, 2, 0, 3).contiguous()   # (p, b, heads, rows)
                    .mean(dim=3).sum(dim=1, keepdim=True)                   # (p, 1, heads)
                    for p0, p1 in _spans(n, step)]
        per_batch.append(torch.cat(per_step, dim=0))
    return torch.cat(per_batch, dim=1).sum(dim=1)


def split_scores(cos: torch.Tensor, floats_per_image: int) -> torch.Tensor:
    """Scores ``(n,)`` of softmax split candidates from ``cos: (n, images, heads, rows)``: one
    candidate at a time, the mean over heads and rows, the sum over images."""
    n, images = cos.shape[0], cos.shape[1]
    _, batch = _steps(images, floats_per_image, _BUDGET)
    per_batch = []
    for b0, b1 in _spans(images, batch):
        per_batch.append(torch.cat([cos[i:i + 1, b0:b1].contiguous().mean(dim=(2, 3)).sum(dim=1, keepdim=True)
                                    for i in range(n)]))                    # (n, 1)
    return torch.cat(per_batch, dim=1).sum(dim=1)

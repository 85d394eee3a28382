"""Fidelity of a quantized model to its float model, from their logits on the same images.

Top-1 accuracy alone cannot tell close methods apart (a one-ulp nudge of the input flips a few
percent of predictions of a real model); top-1 agreement with the float model and the mean
``KL(p_float ‖ p_quant)`` measure how far the quantized function moved, image by image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(ref: torch.Tensor, out: torch.Tensor) -> None:
    if ref.shape != out.shape or ref.dim() != 2:
        raise ValueError(f"need two (images, classes) logit tensors of one shape, got {tuple(ref.shape)} and {tuple(out.shape)}")


def top1_agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Percent of images whose top-1 class equals the reference model's."""
    _check(ref_logits, logits)
    return 100.0 * float((ref_logits.argmax(-1) == logits.argmax(-1)).double().mean())


def kl_per_image(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(ref) ‖ softmax(logits))`` per image, in nats, computed in float64."""
    _check(ref_logits, logits)
    log_p = F.log_softmax(ref_logits.double(), -1)
    log_q = F.log_softmax(logits.double(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def mean_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over images of ``KL(softmax(ref) ‖ softmax(logits))`` (nats)."""
    return float(kl_per_image(ref_logits, logits).mean())


def fidelity(ref_logits: torch.Tensor, logits: torch.Tensor) -> dict:
    """``{"agreement": %, "kl": nats, "n_compared": images}`` over the images both evaluations read
    (rows that are NaN in either, i.e. unreadable images, are left out)."""
    _check(ref_logits, logits)
    ok = ~(torch.isnan(ref_logits).any(-1) | torch.isnan(logits).any(-1))
    if not ok.any():
        return {"agreement": None, "kl": None, "n_compared": 0}
    return {"agreement": top1_agreement(ref_logits[ok], logits[ok]), "kl": mean_kl(ref_logits[ok], logits[ok]),
            "n_compared": int(ok.sum())}

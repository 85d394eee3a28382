"""How much a top on the softmax twin saves at low bits (docs/lowbit.md §12), block by block, on the real ViT-S/14.

Usage: python benchmarks/softmax_top_error.py [--bits 4] [--images 8]

Runs the float model on the first ``--images`` images of the calibration draw (cifar10/calib,
seed 3), takes every block's attention probabilities ``p`` and values ``v``, and prints the relative
error ``‖q(p) v - p v‖² / ‖p v‖²`` of the twin with renormalized rows (``rotq``'s softmax operand):
the best split with the range ending at 1 (the plain twin), and the best split and top together
(the candidates the calibration searches). v stays float: the figure isolates the softmax operand.
"""
from __future__ import annotations

import argparse

import torch

from ptq4vit.harness import zoo
from ptq4vit.harness.data import ImageFolder, calibration_images
from ptq4vit.quant import renormalize_rows, softmax_split_candidates, softmax_twin_fake_quant
from ptq4vit.quant.twin import softmax_top_candidates


def attention_inputs(model, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per block, the float attention probabilities and values (timm's Attention, computed from its qkv)."""
    caught = []

    def hook(attn, args):
        x = args[0]
        b, n, c = x.shape
        q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        caught.append((((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1), v))

    handles = [blk.attn.register_forward_pre_hook(hook) for blk in model.blocks]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    return caught


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--images", type=int, default=8)
    args = ap.parse_args()
    shared = zoo.shared_dir()
    lm = zoo.create("vit_s14_cifar10", weights=shared / "models")
    images = calibration_images(ImageFolder(shared / "data" / "cifar10" / "calib", lm.transform()), args.images, 3).images
    splits, tops = softmax_split_candidates(), softmax_top_candidates()
    print("| block | largest p | plain twin: error (split) | with a top: error (split, top) |")
    print("|---:|---:|---|---|")
    for k, (p, v) in enumerate(attention_inputs(lm.model, images)):
        ref = p @ v

        def error(split, top):
            out = renormalize_rows(softmax_twin_fake_quant(p, split, args.bits, "select", top), p) @ v
            return float((out - ref).double().square().sum() / ref.double().square().sum())

        plain = min((error(s, None), float(s)) for s in splits)
        best = min((error(s, t), float(s), float(t)) for s in splits for t in tops)
        print(f"| {k} | {float(p.max()):.3f} | {plain[0]:.4f} (2^{int(torch.log2(torch.tensor(plain[1])))}) "
              f"| {best[0]:.4f} (2^{int(torch.log2(torch.tensor(best[1])))}, {best[2]:.3f}) |", flush=True)


if __name__ == "__main__":
    main()

"""The released RepQ-ViT classification code against ptq4vit's ``repq-vit`` preset on the real ViT-S/14.

Runs the released ``test_quant.main()`` unchanged on the issue-10 set-up (docs/lowbit.md §6): only
its model and data are injected — ``timm.create_model`` returns the real ViT-S/14 CIFAR-10 model
(which the released ``build_model`` then rewires with its own attention forward and matmul modules),
``build_dataset`` yields the project's 32 calibration images (cifar10/calib, seed 3) and the first
``--limit`` test images per class, and ``validate`` keeps the logits. Then ``repq-vit`` calibrates
the same model on the same images, as it is (which rounds as the released code does) and with
``reparam_fold_float64=true``. For each bit width it prints top-1,
agreement with the float model and mean KL(float‖quant) of each, and how far each ``repq-vit``
model is from the released one (the share of images where they predict alike, the largest logit
difference).

The released code is not part of this repository: pass a checkout of
https://github.com/zkkli/RepQ-ViT (its ``classification`` folder) as ``--released``. Usage:

    python benchmarks/repq_released.py --released ~/RepQ-ViT/classification [--bits W8A8,W6A6,W4A4] [--limit 100]
"""
from __future__ import annotations

import argparse
import copy
import importlib
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import ptq4vit
from ptq4vit.harness import zoo
from ptq4vit.harness.data import ImageFolder, calibration_images, make_loader
from ptq4vit.harness.fidelity import mean_kl, top1_agreement
from ptq4vit.harness.runner import parse_bits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lowbit_accuracy import logits_of  # noqa: E402  (benchmarks/ is not a package)


def import_released(src: Path):
    """The released ``test_quant`` module, imported from its checkout (its own ``utils``/``quant`` packages)."""
    if not (src / "test_quant.py").is_file():
        raise SystemExit(f"--released {src}: expected RepQ-ViT's classification folder (with test_quant.py)")
    sys.path.insert(0, str(src))
    return importlib.import_module("test_quant")


def adapt_to_timm1(model: torch.nn.Module) -> torch.nn.Module:
    """Two changes the released code, written for timm 0.4, needs on a timm 1.x ViT; neither changes
    what it computes. Its attention forward gets the ``attn_mask=None, is_causal=False`` that timm 1.x
    blocks pass. The identity ``q_norm``/``k_norm``/``norm`` a timm 1.x block holds inside attention and
    MLP are hidden from ``named_modules()``, where the released reparameterization loop takes every
    name with "norm" in it for a LayerNorm to fold (and fails on them); they stay callable."""
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if "norm" not in name:
                    continue
                if not isinstance(child, torch.nn.Identity):
                    raise SystemExit(f"{name} in {type(parent).__name__} is {type(child).__name__}, not an identity: "
                                     "the released RepQ-ViT code does not handle it")
                del parent._modules[name]
                parent.__dict__[name] = child
        released_forward = block.attn.forward

        def forward(x, attn_mask=None, is_causal=False, _released=released_forward):
            if attn_mask is not None or is_causal:
                raise ValueError("the released attention forward takes no attention mask")
            return _released(x)
        block.attn.forward = forward
    return model


def run_released(tq, model: torch.nn.Module, calib: torch.Tensor, test, bits: int) -> torch.Tensor:
    """``test_quant.main()`` at W``bits``A``bits`` on ``model``; returns the logits its validation saw."""
    kept = []

    def validate(args, val_loader, q_model, criterion, device):
        with torch.no_grad():
            kept.extend(q_model(images) for images, _ in val_loader)
        return 0.0, 0.0, 0.0

    def val_batches():
        for batch in make_loader(test, batch_size=50, num_workers=0):
            yield batch.images, batch.labels

    tq.args = SimpleNamespace(model="vit_small", dataset="", calib_batchsize=len(calib), val_batchsize=50,
                              num_workers=0, device="cpu", print_freq=100, seed=0, w_bits=bits, a_bits=bits)
    tq.build_dataset = lambda args: ([(calib, None)], val_batches())
    build_model_module = sys.modules[tq.build_model.__module__]
    build_model_module.timm = SimpleNamespace(create_model=lambda name, pretrained: copy.deepcopy(model))
    released_build_model = build_model_module.build_model
    tq.build_model = lambda name: adapt_to_timm1(released_build_model(name))
    tq.validate = validate
    tq.main()
    return torch.cat(kept)


def table_row(name: str, logits: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor, seconds: float) -> str:
    top1 = 100.0 * float((logits.argmax(-1) == labels).double().mean())
    return (f"| {name} | {top1:.1f} | {top1_agreement(ref, logits):.1f} | {mean_kl(ref, logits):.4f} "
            f"| {seconds:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--released", type=Path, required=True, help="RepQ-ViT checkout's classification folder")
    ap.add_argument("--bits", default="W8A8,W6A6,W4A4")
    ap.add_argument("--limit", type=int, default=100, help="test images per class")
    ap.add_argument("--calib-size", type=int, default=32)
    args = ap.parse_args()
    tq = import_released(args.released.expanduser())
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    lm = zoo.create("vit_s14_cifar10", weights=zoo.shared_dir() / "models")
    tf = lm.transform()
    cifar = zoo.shared_dir() / "data" / "cifar10"
    test = ImageFolder(cifar / "test", tf, limit_per_class=args.limit, strict=True)
    calib = calibration_images(ImageFolder(cifar / "calib", tf), args.calib_size, seed=3).images
    ref, labels = logits_of(lm.model, test)
    print(f"float top-1 {100.0 * float((ref.argmax(-1) == labels).double().mean()):.1f}% on {len(labels)} images\n")

    print("| run | top-1 (%) | agreement (%) | KL(float‖quant) | calib+eval s |")
    print("|---|---:|---:|---:|---:|")
    for bits_text in args.bits.split(","):
        w_bits, a_bits = parse_bits(bits_text)
        if w_bits != a_bits:
            raise SystemExit(f"--bits {bits_text}: the released code takes one bit width for both")
        t0 = time.perf_counter()
        released = run_released(tq, lm.model, calib, test, w_bits)
        t1 = time.perf_counter()
        print(table_row(f"released RepQ-ViT {bits_text}", released, ref, labels, t1 - t0))
        for fold_float64 in (False, True):
            t1 = time.perf_counter()
            q = ptq4vit.quantize(lm.model, calib, "repq-vit", w_bits, a_bits, progress=False,
                                 reparam_fold_float64=fold_float64)
            mine, _ = logits_of(q, test)
            name = f"`repq-vit` {bits_text}" + (" reparam_fold_float64=true" if fold_float64 else "")
            print(table_row(name, mine, ref, labels, time.perf_counter() - t1))
            print(f"| (alike with the released: {top1_agreement(released, mine):.1f}% of predictions, largest logit "
                  f"difference {float((released - mine).abs().max()):.2e}) | | | | |", flush=True)


if __name__ == "__main__":
    main()

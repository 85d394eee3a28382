"""int8 ONNX vs fake-quantized torch on the real ViT-S/14 CIFAR-10 model: top-1 agreement, max logit error.

Usage: python benchmarks/onnx_agreement.py [--limit 100 | --all] [--checkpoint FILE] [--out runs/onnx_agreement]
           [--pow2-ablation] [--bits 8]

* Model: ../shared/models/vit_small_patch14_dinov2_focus_cifar10.safetensors (float32), inputs resized
  to 224 bicubic without crop, ImageNet mean/std (the zoo entry ``vit_s14_cifar10``).
* Calibration: the ``ptq4vit`` preset at W8A8 on 32 images of cifar10/calib, drawn with docs/method.md §6's
  ``permutation(n)[:32]`` (seed 3). The quantized model is saved as a checkpoint (``--out``) and
  ``--checkpoint`` reuses one, so the comparison can be rerun without calibrating.
* Comparison: the first ``--limit`` test images of each class (default 100, i.e. 1000 images;
  ``--all`` for the 10 000), int8 ONNX (onnxruntime CPU) vs the fake-quantized torch model:
  top-1 agreement, largest and mean |logit difference|, and every variant's top-1.
* Noise floor: the fake-quantized torch model is also run on the same images multiplied by
  ``1 + 1e-7·N(0,1)`` (about one float32 ulp, the size of the rounding differences between two
  float libraries). Its agreement with the unperturbed run is the most any float-exact
  reimplementation (ONNX Runtime included) can be expected to reach: near a rounding boundary a
  code flips, and at W8A8 a flip early in the network cascades into later layers.
  ``--no-noise-floor`` skips it.
* ``--pow2-ablation``: also calibrate with a free GELU Δ+ (``gelu_pow2=False``) and report the
  fake-quantized top-1 of both, i.e. what the power-of-two restriction costs in accuracy.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

import ptq4vit
from ptq4vit import checkpoint as ck
from ptq4vit.harness import zoo
from ptq4vit.harness.data import ImageFolder, calibration_images, make_loader
from ptq4vit.export import export_onnx
from ptq4vit.export.bench import compare_outputs
from ptq4vit.export.ort import make_session

MODEL = "vit_s14_cifar10"
NOISE_FLOOR = "fakequant-torch, input x(1+1e-7 N)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=100, help="test images per class (default: %(default)s)")
    p.add_argument("--all", action="store_true", help="all 10 000 test images")
    p.add_argument("--bits", type=int, default=8, help="W and A bits (default: %(default)s)")
    p.add_argument("--checkpoint", default=None, help="reuse this quantized checkpoint instead of calibrating")
    p.add_argument("--out", default="runs/onnx_agreement", help="folder for the checkpoint and ONNX files")
    p.add_argument("--calib-size", type=int, default=32)
    p.add_argument("--pow2-ablation", action="store_true", help="also measure gelu_pow2=False")
    p.add_argument("--no-noise-floor", action="store_true", help="skip the perturbed fake-quant run")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=50)
    args = p.parse_args()
    shared = zoo.shared_dir()
    if not (shared / "models").is_dir():
        raise SystemExit(f"shared data not found at {shared} (set PTQ4VIT_SHARED)")
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    lm = zoo.create(MODEL, weights=shared / "models")
    transform = lm.transform()
    print(f"model {lm.entry.short} ({lm.timm_name}), weights {lm.weights}; data config {lm.data_config}")
    calib_ds = ImageFolder(shared / "data" / "cifar10" / "calib", transform, what="calibration folder")

    def calibrate(**overrides):
        cal = calibration_images(calib_ds, args.calib_size, 3)
        t0 = time.perf_counter()
        q = ptq4vit.quantize(lm.model, cal.images, "ptq4vit", args.bits, args.bits, progress=False, **overrides)
        print(f"calibrated ptq4vit W{args.bits}A{args.bits} {overrides or ''} on {len(cal.images)} cifar10/calib images "
              f"in {time.perf_counter() - t0:.0f} s")
        return q

    if args.checkpoint:
        q = ptq4vit.load(args.checkpoint)
        print(f"loaded {args.checkpoint}")
    else:
        q = calibrate()
        path = out / f"vit_s14_cifar10_ptq4vit_w{args.bits}a{args.bits}.safetensors"
        ck.save(q, path, data_config=lm.data_config)
        print(f"saved {path}")
    onnx_int8 = out / f"vit_s14_cifar10_w{args.bits}a{args.bits}_int8.onnx"
    rep = export_onnx(q, onnx_int8)
    print(rep.summary())
    sess = make_session(str(onnx_int8), threads=threads)

    limit = None if args.all else args.limit
    test = ImageFolder(shared / "data" / "cifar10" / "test", transform, limit_per_class=limit, what="test folder")
    what = "all" if limit is None else f"the first {limit} per class"
    print(f"test images: {len(test)} ({what})")
    q_nopow2 = calibrate(gelu_pow2=False) if args.pow2_ablation else None
    logits = {"float-torch": [], "fakequant-torch": [], "int8-onnx": []}
    if q_nopow2 is not None:
        logits["fakequant-torch gelu_pow2=False"] = []
    if not args.no_noise_floor:
        logits[NOISE_FLOOR] = []
    noise = torch.Generator().manual_seed(0)
    labels = []
    t0 = time.perf_counter()
    for i, batch in enumerate(make_loader(test, batch_size=args.batch)):
        x = batch.images
        with torch.no_grad():
            logits["fakequant-torch"].append(q(x).numpy())
            logits["float-torch"].append(lm.model(x).numpy())
            if q_nopow2 is not None:
                logits["fakequant-torch gelu_pow2=False"].append(q_nopow2(x).numpy())
            if NOISE_FLOOR in logits:
                logits[NOISE_FLOOR].append(q(x * (1 + 1e-7 * torch.randn(x.shape, generator=noise))).numpy())
        logits["int8-onnx"].append(sess.run(None, {"input": x.numpy()})[0])
        labels.append(batch.labels.numpy())
        if i % 5 == 4:
            done = sum(len(v) for v in labels)
            print(f"  {done}/{len(test)} images, {time.perf_counter() - t0:.0f} s", flush=True)
    labels = np.concatenate(labels)
    logits = {k: np.concatenate(v) for k, v in logits.items()}
    for k, v in logits.items():
        print(f"top-1 {k:<34s} {100 * np.mean(v.argmax(1) == labels):6.2f}%")
    c = compare_outputs(logits["fakequant-torch"], logits["int8-onnx"])
    print(f"int8 ONNX vs fake-quantized torch on {c['n_images']} CIFAR-10 test images ({what}): "
          f"top-1 agreement {c['top1_agreement']:.2f}%, max |logit error| {c['max_abs_logit_error']:.4g}, "
          f"mean {c['mean_abs_logit_error']:.3g} (logits up to {c['max_abs_logit']:.3g})")
    if NOISE_FLOOR in logits:
        c = compare_outputs(logits["fakequant-torch"], logits[NOISE_FLOOR])
        print(f"noise floor: fake-quantized torch vs itself on inputs x(1 + 1e-7 N(0,1)): top-1 agreement "
              f"{c['top1_agreement']:.2f}%, max |logit error| {c['max_abs_logit_error']:.4g}, "
              f"mean {c['mean_abs_logit_error']:.3g}")
    top2 = np.sort(logits["fakequant-torch"], axis=1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    print(f"images whose fake-quant top-1/top-2 logit gap is below 0.5: {100 * np.mean(gap < 0.5):.1f}% "
          f"(median gap {np.median(gap):.2f})")
    if q_nopow2 is not None:
        a, b = (100 * np.mean(logits[k].argmax(1) == labels) for k in ("fakequant-torch", "fakequant-torch gelu_pow2=False"))
        print(f"power-of-two GELU Δ+ costs {b - a:+.2f} points of top-1 here ({a:.2f}% with it, {b:.2f}% with a free Δ+)")


if __name__ == "__main__":
    main()

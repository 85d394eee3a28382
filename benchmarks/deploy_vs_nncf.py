"""ptq4vit int8 on ONNX Runtime and OpenVINO against NNCF + OpenVINO int8: speed, top-1, agreement.

Usage: python benchmarks/deploy_vs_nncf.py [--models vit_s14_cifar10 deit_s] [--batches 8 1] [--repeats 10]
           [--threads 2] [--limit 100] [--checkpoint FILE] [--preset fast8] [--deploy-preset deploy8]
           [--workdir runs/deploy_vs_nncf]
           [--variants ...] [--no-accuracy] [--build-only]

Needs the ``bench`` extra (onnxruntime, openvino, nncf) and ../shared (``$PTQ4VIT_SHARED``).

* Models: the real ViT-S/14 CIFAR-10 classifier (``vit_s14_cifar10``, weights from shared/models)
  and DeiT-S/224 with random weights (``deit_s``, init seed 0; its top-1 means nothing, its
  agreement with float does). Both take the ViT-S/14 evaluation transform (224, bicubic).
* Calibration: 32 images of cifar10/calib, the project's draw (seed 3), for both NNCF and ptq4vit.
  - NNCF as its documentation does for transformers: the float model read by OpenVINO,
    ``nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=32)``.
  - ptq4vit W8A8 with ``--preset`` (default ``fast8``, about a minute); ``--checkpoint`` uses a saved
    quantized ViT-S/14 instead (e.g. the full ``ptq4vit`` preset, 8-17 min to calibrate).
  - ptq4vit W8A8 with ``--deploy-preset`` (default ``deploy8``: only the linear layers quantized,
    per-channel smoothed weights, attention float, no twins; its calibration seconds are printed).
  Everything built (checkpoints, ONNX, OpenVINO IR) is cached in ``--workdir``: a re-run only times.
* Variants (``--variants`` picks a subset): ``ort-fp32``, ``ort-contrib`` (ptq4vit int8,
  ``MatMulIntegerToFloat``, ``gemm="auto"``), ``ort-qdq`` (ptq4vit standard QDQ), ``ov-fp32``
  (OpenVINO, INFERENCE_PRECISION_HINT=f32), ``ov-qdq`` (ptq4vit QDQ on OpenVINO, f32 hint),
  ``ov-qdq-fa`` (the same with ``float_attention=True``: q @ kᵀ and softmax @ v float, which
  lets OpenVINO fuse attention as it does for NNCF's model, which leaves them float),
  ``ov-deploy`` (the ``--deploy-preset`` model's QDQ graph on OpenVINO, f32 hint), ``ort-deploy``
  (the same graph on ONNX Runtime), ``nncf`` (NNCF int8, f32 hint), and the same five OpenVINO
  ones with the plugin's default precision (``ov-default``, ``ov-qdq-default``,
  ``ov-qdq-fa-default``, ``ov-deploy-default``, ``nncf-default``: bf16 float layers where the CPU
  has it).
* Timing: for each batch size all variants run once in turn, ``--repeats`` times (interleaved:
  other load on the machine hits them alike), after 3 warm-up rounds; medians; ratios are
  against each runtime's own float32 (ORT variants vs ``ort-fp32``; OpenVINO variants vs
  ``ov-fp32``, or ``ov-default`` for the default-precision ones).
* Accuracy (unless ``--no-accuracy``): the first ``--limit`` cifar10/test images of each class
  (default 100: 1000 images); top-1 of each variant and top-1 agreement with the float model
  (``ort-fp32``, which equals torch's float logits to ~1e-6).

Prints the CPU and its int8/bf16 flags first, and for each OpenVINO variant what its executed
graph holds (product layers by runtime precision; FakeQuantize, Reorder, fused Subgraph counts).
``--build-only`` builds the cache and stops. Not yet timed on an idle machine: the estimate for
a cached run on 2 idle cores is 1-2 minutes of timing per model plus 3-5 minutes of accuracy
per model (1000 images, 5 variants); to stay under ~8 minutes run the ViT-S/14 with accuracy
and DeiT-S with ``--no-accuracy`` (two commands, the same ``--workdir``).
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

import ptq4vit
from ptq4vit import checkpoint as ck
from ptq4vit.harness import zoo
from ptq4vit.harness.data import ImageFolder, calibration_images, make_loader
from ptq4vit.export import export_onnx
from ptq4vit.export.cpu import cpu_flags, cpu_name
from ptq4vit.export.openvino import compile_onnx, executed_layers
from ptq4vit.export.ort import make_session

MODELS = {"vit_s14_cifar10": "real weights (shared/models)", "deit_s": "random init, seed 0"}
VARIANTS = ("ort-fp32", "ort-contrib", "ort-qdq", "ort-deploy", "ov-fp32", "ov-qdq", "ov-qdq-fa", "ov-deploy", "nncf",
            "ov-default", "ov-qdq-default", "ov-qdq-fa-default", "ov-deploy-default", "nncf-default")
BASELINE = {"ort": "ort-fp32", "ov": "ov-fp32", "ov-default": "ov-default"}
ACCURACY_DEFAULT = ("ort-fp32", "ort-contrib", "ov-qdq", "ov-qdq-fa", "ov-deploy", "nncf")


def runtime_of(variant: str) -> str:
    if variant.startswith("ort"):
        return "ort"
    return "ov-default" if variant.endswith("default") else "ov"


def log(msg: str) -> None:
    print(msg, flush=True)


class Built:
    """The files of one model: float ONNX, ptq4vit int8 (contrib, QDQ, deployment preset QDQ), NNCF int8 IR."""

    def __init__(self, workdir: Path, key: str, deploy_preset: str):
        self.dir = workdir / key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fp32 = self.dir / "fp32.onnx"
        self.contrib = self.dir / "ptq4vit_int8_contrib.onnx"
        self.qdq = self.dir / "ptq4vit_int8_qdq.onnx"
        self.qdq_fa = self.dir / "ptq4vit_int8_qdq_float_attention.onnx"
        self.nncf = self.dir / "nncf_int8.xml"
        self.deploy_ckpt = self.dir / f"ptq4vit_{deploy_preset}_w8a8.safetensors"
        self.deploy = self.dir / f"ptq4vit_{deploy_preset}_int8_qdq.onnx"


def load_model(key: str, shared: Path):
    vit = zoo.create("vit_s14_cifar10", weights=shared / "models")
    if key == "vit_s14_cifar10":
        return vit
    lm = zoo.create("DeiT-S/224", pretrained=False, init_seed=0)
    lm.data_config = vit.data_config  # the same CIFAR images at 224 for both models
    return lm


def build(key: str, args, shared: Path, calib: torch.Tensor, lm) -> Built:
    b = Built(Path(args.workdir), key, args.deploy_preset)
    if not b.fp32.exists():
        export_onnx(lm.model, b.fp32, int8=False, batch_size=None)
        log(f"  wrote {b.fp32}")
    wanted = set(args.variants)
    if (wanted & {"ort-contrib", "ort-qdq", "ov-qdq", "ov-qdq-fa", "ov-qdq-default", "ov-qdq-fa-default"}
            and not (b.contrib.exists() and b.qdq.exists() and b.qdq_fa.exists())):
        ckpt = Path(args.checkpoint) if (args.checkpoint and key == "vit_s14_cifar10") else \
            b.dir / f"ptq4vit_{args.preset}_w8a8.safetensors"
        if ckpt.exists():
            q = ptq4vit.load(ckpt, model=lm.model)
            log(f"  loaded {ckpt}")
        else:
            t0 = time.perf_counter()
            q = ptq4vit.quantize(lm.model, calib, args.preset, 8, 8, progress=True)
            log(f"  ptq4vit {args.preset} W8A8 on {len(calib)} images: {time.perf_counter() - t0:.0f} s "
                f"(contended unless the machine was idle)")
            ck.save(q, ckpt, data_config=lm.data_config)
        rep = export_onnx(q, b.contrib, gemm="auto")
        log("  " + rep.summary().replace("\n", "\n  "))
        export_onnx(q, b.qdq, format="qdq")
        export_onnx(q, b.qdq_fa, format="qdq", float_attention=True)
    if wanted & {"ort-deploy", "ov-deploy", "ov-deploy-default"} and not b.deploy.exists():
        if b.deploy_ckpt.exists():
            q = ptq4vit.load(b.deploy_ckpt)  # (not model=: calibration rewrote the linear weights it rounded)
            log(f"  loaded {b.deploy_ckpt}")
        else:
            t0 = time.perf_counter()
            q = ptq4vit.quantize(lm.model, calib, args.deploy_preset, 8, 8, progress=False)
            log(f"  ptq4vit {args.deploy_preset} W8A8 on {len(calib)} images: calibration {time.perf_counter() - t0:.1f} s "
                f"(contended unless the machine was idle)")
            ck.save(q, b.deploy_ckpt, data_config=lm.data_config)
        rep = export_onnx(q, b.deploy, format="qdq")
        log("  " + rep.summary().replace("\n", "\n  "))
    if wanted & {"nncf", "nncf-default"} and not b.nncf.exists():
        import nncf
        import openvino as ov
        t0 = time.perf_counter()
        ov_model = ov.Core().read_model(str(b.fp32))
        data = nncf.Dataset([calib[i:i + 1].numpy() for i in range(len(calib))])
        qm = nncf.quantize(ov_model, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))
        ov.save_model(qm, str(b.nncf))
        log(f"  NNCF int8 (transformer, {len(calib)} images): {time.perf_counter() - t0:.0f} s")
    return b


def runners(b: Built, variants, threads: int) -> dict:
    """variant -> callable(images) -> logits."""
    out = {}
    for v in variants:
        if v.startswith("ort"):
            path = {"ort-fp32": b.fp32, "ort-contrib": b.contrib, "ort-qdq": b.qdq, "ort-deploy": b.deploy}[v]
            s = make_session(str(path), threads=threads)
            out[v] = lambda x, s=s: s.run(None, {"input": x})[0]
        else:
            path = (b.nncf if v.startswith("nncf") else b.qdq_fa if v.startswith("ov-qdq-fa") else
                    b.deploy if v.startswith("ov-deploy") else
                    b.qdq if v.startswith("ov-qdq") else b.fp32)
            m = compile_onnx(path, "default" if v.endswith("default") else "f32", threads=threads)
            req = m.infer_request()
            out[v] = lambda x, req=req: req.infer([np.ascontiguousarray(x)])[0]
            log(f"  {v}: float layers in {m.precision}; executed graph: {layer_census(m)}")
    return out


def layer_census(m) -> str:
    """What OpenVINO executes: product layers by runtime precision, and the other layer types
    that cost time (stand-alone FakeQuantize, Reorder, fused attention Subgraph, ...)."""
    import collections
    products = collections.Counter(f"{k}:{p}" for k, p, _ in executed_layers(m))
    kinds = collections.Counter(op.get_rt_info()["layerType"].astype(str)
                                for op in m.compiled.get_runtime_model().get_ordered_ops())
    others = {k: n for k, n in kinds.items() if k in ("FakeQuantize", "Reorder", "Subgraph", "Eltwise")}
    return (", ".join(f"{n} {k}" for k, n in sorted(products.items())) + " | "
            + ", ".join(f"{n} {k}" for k, n in sorted(others.items())))


def time_interleaved(run: dict, x: np.ndarray, repeats: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        for fn in run.values():
            fn(x)
    times = {k: [] for k in run}
    for _ in range(repeats):
        for k, fn in run.items():
            t0 = time.perf_counter()
            fn(x)
            times[k].append((time.perf_counter() - t0) * 1000)
    return {k: float(np.median(v)) for k, v in times.items()}


def accuracy(run: dict, variants, test, batch: int) -> dict:
    logits = {v: [] for v in variants}
    labels = []
    for bt in make_loader(test, batch_size=batch):
        x = bt.images.numpy()
        for v in variants:
            logits[v].append(run[v](x))
        labels.append(bt.labels.numpy())
    labels = np.concatenate(labels)
    logits = {k: np.concatenate(v) for k, v in logits.items()}
    ref = logits["ort-fp32"].argmax(1)
    return {v: (100 * np.mean(o.argmax(1) == labels), 100 * np.mean(o.argmax(1) == ref)) for v, o in logits.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[8, 1])
    p.add_argument("--repeats", type=int, default=10, help="interleaved timing rounds per batch size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, default=100, help="cifar10/test images per class for accuracy")
    p.add_argument("--checkpoint", default=None, help="quantized ViT-S/14 checkpoint to use instead of calibrating")
    p.add_argument("--preset", default="fast8", help="ptq4vit preset when calibrating (default: %(default)s)")
    p.add_argument("--deploy-preset", default="deploy8",
                   help="ptq4vit preset of the ov-deploy/ort-deploy variants (default: %(default)s)")
    p.add_argument("--workdir", default="runs/deploy_vs_nncf")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--accuracy-variants", nargs="+", default=list(ACCURACY_DEFAULT), choices=VARIANTS)
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--build-only", action="store_true")
    args = p.parse_args()
    shared = zoo.shared_dir()
    if not (shared / "models").is_dir():
        raise SystemExit(f"shared data not found at {shared} (set PTQ4VIT_SHARED)")
    torch.set_num_threads(args.threads)
    import nncf
    import onnxruntime
    import openvino
    log(f"CPU: {cpu_name()} ({platform.machine()}, {os.cpu_count()} logical CPUs visible); "
        f"int8/bf16 flags: {' '.join(cpu_flags()) or 'none of them'}")
    log(f"onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__}, nncf {nncf.__version__}, "
        f"torch {torch.__version__}; {args.threads} threads")
    variants = [v for v in VARIANTS if v in args.variants]
    for key in args.models:
        log(f"\n== {key} ({MODELS[key]})")
        lm = load_model(key, shared)
        transform = lm.transform()
        calib_ds = ImageFolder(shared / "data" / "cifar10" / "calib", transform, what="calibration folder")
        calib = calibration_images(calib_ds, 32, 3).images
        b = build(key, args, shared, calib, lm)
        if args.build_only:
            continue
        run = runners(b, variants, args.threads)
        for batch in args.batches:
            x = np.random.default_rng(0).standard_normal((batch, *calib.shape[1:])).astype(np.float32)
            t0 = time.perf_counter()
            med = time_interleaved(run, x, args.repeats)
            log(f"batch {batch}: {args.repeats} interleaved rounds in {time.perf_counter() - t0:.0f} s")
            for v in variants:
                base = BASELINE[runtime_of(v)]
                ratio = f"{med[base] / med[v]:5.2f}x vs {base}" if base in med and v != base else ""
                log(f"  {v:<16s} {med[v]:9.1f} ms  {ratio}")
            for a, c in (("ov-qdq", "nncf"), ("ov-qdq-fa", "nncf"), ("ov-deploy", "nncf"), ("ort-contrib", "nncf"),
                         ("ort-qdq", "nncf"), ("ort-deploy", "nncf"), ("ov-qdq-default", "nncf-default"),
                         ("ov-qdq-fa-default", "nncf-default"), ("ov-deploy-default", "nncf-default")):
                if a in med and c in med:
                    log(f"  {a} / {c} speed: {med[c] / med[a]:.2f}x (>1: ptq4vit faster)")
        if not args.no_accuracy:
            acc_vars = [v for v in variants if v in args.accuracy_variants]
            if "ort-fp32" not in acc_vars:
                acc_vars = ["ort-fp32"] + acc_vars
                run.setdefault("ort-fp32", runners(b, ["ort-fp32"], args.threads)["ort-fp32"])
            test = ImageFolder(shared / "data" / "cifar10" / "test", transform, limit_per_class=args.limit,
                               what="test folder")
            t0 = time.perf_counter()
            acc = accuracy(run, acc_vars, test, 50)
            log(f"accuracy on {len(test)} cifar10/test images ({time.perf_counter() - t0:.0f} s):")
            for v, (top1, agree) in acc.items():
                what = "" if key == "vit_s14_cifar10" else " (random init: top-1 is chance)"
                log(f"  {v:<16s} top-1 {top1:6.2f}%{what}  top-1 agreement with float {agree:6.2f}%")


if __name__ == "__main__":
    main()

"""int8 vs float32 ONNX Runtime speed of DeiT-S/224 and ViT-S/224 (random init), PTQ4ViT W8A8.

Usage: python benchmarks/onnx_speed.py [--models deit_small_patch16_224 vit_small_patch16_224]
           [--batches 8 1] [--repeats 10] [--threads N] [--calib-images 4] [--full-calibration] [--ablate]

Each model is created with random weights, quantized with the ``ptq4vit`` preset at W8A8 (twin
softmax and power-of-two GELU twin quantizers included) and exported twice: the float32 graph
(quantizers off) and the int8 graph. Calibration only sets scales, which do not change the
speed, so by default it is a short one (4 random images, mse metric, 16 candidates, 1 round;
``--full-calibration`` runs the preset as it is). The three variants (float32 ONNX, int8 ONNX,
fake-quantized torch) are timed interleaved (one run of each in turn) so that other load on the
machine hits them alike; median and best latencies and the int8/float32 ratio are printed, then
ORT's time per operator ("where the time goes").

``--ablate`` adds two int8 graphs to show what the twin quantizers and the GEMM flavour cost:
the same model without the GELU twin (uniform fc2 input: one GEMM instead of two), and
``gemm="vnni"`` (u8 x s8 everywhere: what a VNNI CPU runs; on AVX2-only CPUs it is *not exact*,
its speed is shown for reference only).
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import timm
import torch

import ptq4vit
from ptq4vit.export import cpu_has_vnni, export_onnx
from ptq4vit.export.bench import op_breakdown
from ptq4vit.export.ort import make_session

QUICK = dict(metric="mse", n_candidates=16, rounds=1)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "?"
    keep = [f for f in flags if f.startswith("avx512") or f in ("avx2", "avx_vnni", "amx_int8", "fma")]
    return " ".join(sorted(keep)) or "none of avx2/avx512/vnni"


def interleaved(sessions: dict, x: np.ndarray, repeats: int, torch_fn=None) -> dict:
    fns = {k: (lambda s=s: s.run(None, {"input": x})) for k, s in sessions.items()}
    if torch_fn is not None:
        fns["fakequant-torch"] = torch_fn
    for fn in fns.values():  # warm-up
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1000)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "vit_small_patch16_224"])
    p.add_argument("--batches", nargs="+", type=int, default=[8, 1])
    p.add_argument("--repeats", type=int, default=10, help="timed runs per variant at batch 8 (x3 at batch 1)")
    p.add_argument("--threads", type=int, default=None, help="ORT/torch intra-op threads (default: all cores)")
    p.add_argument("--calib-images", type=int, default=4)
    p.add_argument("--full-calibration", action="store_true", help="the ptq4vit preset as it is (slow on CPU)")
    p.add_argument("--ablate", action="store_true", help="also time int8 without the GELU twin, and gemm=vnni")
    p.add_argument("--no-torch", action="store_true", help="skip the fake-quantized torch model")
    p.add_argument("--spin", action="store_true",
                   help="let ORT's idle threads busy-wait (ORT's default; off here because on a shared machine "
                        "spinning threads steal the time slices the other thread needs)")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--workdir", default=None, help="keep the ONNX files here (default: a temporary folder)")
    p.add_argument("--reuse", action="store_true", help="time the ONNX files already in --workdir (no calibration)")
    args = p.parse_args()
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    workdir = args.workdir or tempfile.mkdtemp(prefix="ptq4vit-onnx-speed-")
    os.makedirs(workdir, exist_ok=True)
    import onnxruntime as ort
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores; flags: {cpu_flags()}; VNNI: {cpu_has_vnni()}")
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, {threads} threads, ORT spinning "
          f"{'on' if args.spin else 'off'}; load average at start {os.getloadavg()[0]:.1f}")
    calib = "the ptq4vit preset as is" if args.full_calibration else \
        f"short: {QUICK['metric']} metric, {QUICK['n_candidates']} candidates, {QUICK['rounds']} round"
    print(f"calibration: {args.calib_images} random images, {calib} (scales do not change the speed)\n")
    summary = []
    vnni_key = "int8 gemm=vnni" if cpu_has_vnni() else "int8 gemm=vnni (inexact here)"
    for name in args.models:
        paths = {"float32": os.path.join(workdir, f"{name}_float32.onnx"),
                 "int8": os.path.join(workdir, f"{name}_int8.onnx")}
        if args.ablate:
            paths[vnni_key] = os.path.join(workdir, f"{name}_int8_vnni.onnx")
            paths["int8 no GELU twin"] = os.path.join(workdir, f"{name}_int8_nogelutwin.onnx")
        q = None
        if args.reuse and all(os.path.exists(v) for v in paths.values()):
            print(f"== {name}: reusing the ONNX files in {workdir} (the fake-quantized torch model is not timed)")
        else:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False).eval()
            images = torch.randn(args.calib_images, 3, 224, 224, generator=torch.Generator().manual_seed(1))
            overrides = {} if args.full_calibration else QUICK
            t0 = time.perf_counter()
            q = ptq4vit.quantize(model, images, "ptq4vit", 8, 8, progress=False, **overrides)
            print(f"== {name}: calibrated in {time.perf_counter() - t0:.0f} s")
            export_onnx(q, paths["float32"], int8=False)
            print(export_onnx(q, paths["int8"]).summary())
            if args.ablate:
                export_onnx(q, paths[vnni_key], gemm="vnni")
                q_nogelu = ptq4vit.quantize(model, images, "ptq4vit", 8, 8, progress=False, gelu_twin=False, **overrides)
                export_onnx(q_nogelu, paths["int8 no GELU twin"])
        sessions = {k: make_session(v, threads=threads, spinning=args.spin) for k, v in paths.items()}
        for b in args.batches:
            x = np.random.default_rng(0).standard_normal((b, 3, 224, 224)).astype(np.float32)
            xt = torch.from_numpy(x)

            def run_torch():
                with torch.no_grad():
                    q(xt)
            reps = args.repeats if b >= 8 else args.repeats * 3
            times = interleaved(sessions, x, reps, None if (args.no_torch or q is None) else run_torch)
            print(f"batch {b} ({reps} interleaved runs each):")
            for k, v in times.items():
                print(f"  {k:<32s} median {np.median(v):8.1f} ms   best {min(v):8.1f} ms   "
                      f"{b / (np.median(v) / 1000):7.1f} img/s")
            f32 = times["float32"]
            for k in times:
                if k.startswith("int8"):
                    rm, rb = np.median(f32) / np.median(times[k]), min(f32) / min(times[k])
                    print(f"  -> {k} / float32 speed ratio: {rm:.2f}x (median), {rb:.2f}x (best)")
                    if k == "int8":
                        summary.append((name, b, rm, rb))
        if not args.no_profile:
            b = max(args.batches)
            for k in ("float32", "int8"):
                print(f"where the time goes, {k} ONNX, batch {b}:")
                print(op_breakdown(paths[k], (3, 224, 224), b, threads=threads, runs=2, spinning=args.spin))
        print()
    print("summary: int8 ONNX speed over float32 ONNX (onnxruntime CPU)")
    for name, b, rm, rb in summary:
        print(f"  {name:<26s} batch {b}: {rm:.2f}x median, {rb:.2f}x best")
    print(f"(load average at end {os.getloadavg()[0]:.1f}; other processes on the machine make single timings noisy)")


if __name__ == "__main__":
    main()

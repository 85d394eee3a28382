"""Calibration slowdown under CPU contention: one thread, and the default (sites searched side by side).

Usage: python benchmarks/calibration_contention.py [--competitors 6] [--img-size 96] [--depth 4]
       [--images 16] [--preset ptq4vit]

Calibrates a random-init ViT-Ti (reduced image size and depth) four times in one process:
alone and next to ``--competitors`` busy-looping Python processes that the script starts and
kills itself, each with ``threads=1`` (one site at a time on one thread: nothing ever waits
for another thread, so it slows exactly as its CPU share shrinks) and the default (capture on
one intra-op thread per usable CPU, the search on as many sites side by side, one thread
each). It prints each wall time and CPU time, the slowdown factors, the slowdown a fair CPU
share would give (competitors and our threads sharing the CPUs equally), and whether all four
runs chose the same scales. Take the figures on a machine where nothing else runs: other jobs
change both the alone and the loaded times.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

import timm
import torch

import ptq4vit
from ptq4vit.calib import default_workers
from ptq4vit.calib.resources import cgroup_cpu_quota, cgroup_memory_headroom, usable_cpus

SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
              "amx_tile", "amx_int8", "amx_bf16")


def cpu_description() -> str:
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    simd = [f for f in SIMD_FLAGS if f in flags]
    return f"{model}; SIMD flags: {' '.join(simd) or 'none found'}"


def start_competitors(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(model, images, args, threads):
    """Wall seconds, CPU seconds of this process, and the chosen scales."""
    start, cpu = time.perf_counter(), cpu_seconds()
    q = ptq4vit.quantize(model, images, args.preset, *args.bits, threads=threads, progress=False)
    return time.perf_counter() - start, cpu_seconds() - cpu, q.qparams()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--preset", default="ptq4vit")
    parser.add_argument("--bits", type=int, nargs=2, default=(8, 8), metavar=("W", "A"))
    parser.add_argument("--competitors", type=int, default=6, help="busy-looping processes started for the loaded runs")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size, depth=args.depth).eval()
    images = torch.randn(args.images, 3, args.img_size, args.img_size)
    torch_threads = torch.get_num_threads()
    quota = cgroup_cpu_quota()
    headroom = cgroup_memory_headroom()
    print(f"{args.model} random init, img {args.img_size}, depth {args.depth}, {args.images} images, {args.preset} "
          f"W{args.bits[0]}A{args.bits[1]}, torch {torch.__version__}")
    print(f"CPU: {cpu_description()}")
    print(f"os.cpu_count {os.cpu_count()}, affinity+quota usable {usable_cpus()}, cgroup CPU quota "
          f"{'none' if quota is None else f'{quota:g} CPUs'}, cgroup memory headroom "
          f"{'unlimited' if headroom is None else f'{headroom >> 20} MiB'}, torch threads {torch_threads}, "
          f"calibration workers by default {default_workers(torch.device('cpu'))}, load average {os.getloadavg()[0]:.2f}")

    # Warm-up (allocator, kernel selection), so that the first timed run pays no start-up cost.
    ptq4vit.quantize(model, images[:2], args.preset, *args.bits, progress=False, n_candidates=4, rounds=1)
    default_threads = min(usable_cpus(), torch_threads)
    policies = {"1 thread": 1, f"default ({default_threads} threads)": None}
    runs = {}
    for label, threads in policies.items():
        runs[("alone", label)] = timed(model, images, args, threads)
    procs = start_competitors(args.competitors)
    try:
        time.sleep(1.0)  # let the competitors reach the run queue
        for label, threads in policies.items():
            runs[("loaded", label)] = timed(model, images, args, threads)
    finally:
        stop(procs)

    cores = usable_cpus()
    print(f"\n{args.competitors} competing busy processes on {cores} CPUs")
    print("| policy | alone s | loaded s | slowdown | fair-share slowdown | CPU s alone | CPU s loaded |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, threads in policies.items():
        ours = threads or default_threads
        (alone, cpu_alone, _), (loaded, cpu_loaded, _) = runs[("alone", label)], runs[("loaded", label)]
        # Equal shares: our `ours` threads get cores * ours / (competitors + ours) CPUs, against min(ours, cores) alone.
        fair = min(ours, cores) * (args.competitors + ours) / (cores * ours)
        print(f"| {label} | {alone:.1f} | {loaded:.1f} | {loaded / alone:.1f}x | {fair:.1f}x | {cpu_alone:.1f} | "
              f"{cpu_loaded:.1f} |")
    first = next(iter(runs.values()))[2]
    print(f"scales identical across the four runs: {all(q == first for _, _, q in runs.values())}")


if __name__ == "__main__":
    main()

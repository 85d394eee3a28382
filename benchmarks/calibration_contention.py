"""Calibration slowdown under CPU contention, with torch's thread count and with the default policy.

Usage: python benchmarks/calibration_contention.py [--competitors 6] [--img-size 96] [--depth 4]
       [--images 16] [--preset ptq4vit]

Calibrates a random-init ViT-Ti (reduced image size and depth) four times in one process:
alone and next to ``--competitors`` busy-looping Python processes that the script starts and
kills itself, each with the old policy (``threads`` pinned to torch's default: one thread per
core, whatever else runs) and the new default (``threads=None``: the search uses one thread
per CPU free when calibration starts; the capture passes keep the fixed count). It prints each wall time, the slowdown factors, the slowdown a fair CPU
share would give, and whether all four runs chose the same scales. Take the figures on a
machine where nothing else runs: other jobs change both the alone and the loaded times.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import timm
import torch

import ptq4vit
from ptq4vit.calib.resources import cgroup_cpu_quota, cgroup_memory_headroom, free_cpus, usable_cpus

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


def timed(model, images, args, threads):
    start = time.perf_counter()
    q = ptq4vit.quantize(model, images, args.preset, *args.bits, threads=threads, progress=False)
    return time.perf_counter() - start, q.qparams()


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
          f"free CPUs now {free_cpus()}")

    # Warm-up (allocator, kernel selection), so that the first timed run pays no start-up cost.
    ptq4vit.quantize(model, images[:2], args.preset, *args.bits, progress=False, n_candidates=4, rounds=1)
    runs = {}
    runs["alone, old (torch threads)"] = timed(model, images, args, torch_threads)
    runs["alone, new (free CPUs)"] = timed(model, images, args, None)
    procs = start_competitors(args.competitors)
    try:
        time.sleep(1.0)  # let the competitors reach the run queue before the thread count is chosen
        loaded_free = free_cpus()
        runs["loaded, old (torch threads)"] = timed(model, images, args, torch_threads)
        runs["loaded, new (free CPUs)"] = timed(model, images, args, None)
    finally:
        stop(procs)

    print(f"\n{args.competitors} competing busy processes; free CPUs seen with them running: {loaded_free}")
    print("| run | wall s |")
    print("|---|---|")
    for name, (seconds, _) in runs.items():
        print(f"| {name} | {seconds:.1f} |")
    old = runs["loaded, old (torch threads)"][0] / runs["alone, old (torch threads)"][0]
    new = runs["loaded, new (free CPUs)"][0] / runs["alone, new (free CPUs)"][0]
    cores = usable_cpus()
    fair = (args.competitors + cores) / cores
    print(f"\nslowdown under load: old {old:.1f}x, new {new:.1f}x; a fair CPU share would give ~{fair:.1f}x "
          f"({args.competitors} competitors + {cores} of ours on {cores} CPUs)")
    same = all(q == runs["alone, old (torch threads)"][1] for _, q in runs.values())
    print(f"scales identical across the four runs: {same}")


if __name__ == "__main__":
    main()

"""Low-bit accuracy and fidelity of the real ViT-S/14 CIFAR-10 model, one configuration per call
(a quick stand-alone tool for exploring; ``benchmarks/lowbit_accuracy.sh`` runs the full table
through ``ptq4vit sweep``).

Calibrates on 32 images of cifar10/calib (seed 3), evaluates the first ``--limit`` test images
of each class, and prints top-1, top-1 agreement with the float model, mean KL(float ‖ quant)
and the calibration seconds. Float logits are computed once per ``--limit`` and cached under
``--out``; each finished configuration is appended to ``--out``/results.jsonl and skipped when
run again (resumable). Usage:

    python benchmarks/lowbit_accuracy.py --preset rotq --bits W4A4 [--set field=value ...] [--label NAME]

With ``--set reconstruction=learned`` the model is reconstructed after calibration (docs/lowbit.md §11)
on the first ``reconstruction.images`` (512 by default) images of the same draw, the 32 calibration images first.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import ptq4vit
from ptq4vit.export.cpu import cpu_name
from ptq4vit.harness import zoo
from ptq4vit.harness.data import ImageFolder, calibration_and_pool, make_loader
from ptq4vit.harness.fidelity import mean_kl, top1_agreement
from ptq4vit.harness.runner import parse_bits


def _value(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


@torch.no_grad()
def logits_of(model, dataset, batch_size: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    outs, labels = [], []
    for batch in make_loader(dataset, batch_size=batch_size, num_workers=0):
        outs.append(model(batch.images))
        labels.append(batch.labels)
    return torch.cat(outs), torch.cat(labels)


def print_table(results: Path) -> None:
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    rows = list({(r["label"], r["limit"]): r for r in rows}.values())  # a run made again replaces its stale row
    print("| run | images | top-1 (%) | agreement (%) | KL(float‖quant) | calib s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['label']} | {r['images']} | {r['top1']:.1f} | {r['agreement']:.1f} | {r['kl']:.4f} | {r['calib_s']:.0f} |")
    if rows:
        print(f"\nfloat top-1 {rows[0]['float_top1']:.1f}% on {rows[0]['images']} images; calib s is wall time "
              f"(each row in results.jsonl also records its CPU seconds and the load average before it)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="ptq4vit")
    ap.add_argument("--bits", default="W4A4")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--label", default=None)
    ap.add_argument("--limit", type=int, default=100, help="test images per class (1000 = all 10 000)")
    ap.add_argument("--calib-size", type=int, default=32)
    ap.add_argument("--out", default="runs/lowbit")
    ap.add_argument("--table", action="store_true", help="print the Markdown table of --out's results and exit")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.table:
        print_table(Path(args.out) / "results.jsonl")
        return

    shared = zoo.shared_dir()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    overrides = {k: _value(v) for k, v in overrides.items()}
    w_bits, a_bits = parse_bits(args.bits)
    label = args.label or " ".join([args.preset, args.bits] + [f"{k}={v}" for k, v in sorted(overrides.items())])
    results = out / "results.jsonl"
    done = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    recipe = ptq4vit.get_recipe(args.preset, **overrides)
    # a row is reused only for the recipe it ran, not for its label: a changed default makes it stale
    recipe_key = json.loads(json.dumps(recipe.key_dict()))
    if any(r["label"] == label and r["limit"] == args.limit and r.get("recipe") == recipe_key for r in done):
        print(f"done already: {label}")
        return

    lm = zoo.create("vit_s14_cifar10", weights=shared / "models")
    tf = lm.transform()
    cifar = shared / "data" / "cifar10"
    test = ImageFolder(cifar / "test", tf, limit_per_class=args.limit, strict=True)
    cache = out / f"float_logits_limit{args.limit}.pt"
    if cache.exists():
        ref, labels = torch.load(cache, map_location="cpu", weights_only=True)
    else:
        ref, labels = logits_of(lm.model, test)
        torch.save((ref, labels), cache)

    # with reconstruction, its pool is the calibration draw continued (as a sweep draws it)
    calib, pool = calibration_and_pool(ImageFolder(cifar / "calib", tf), recipe, args.calib_size, seed=3)
    load_before = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    q = ptq4vit.quantize(lm.model, calib, recipe, w_bits, a_bits, progress=True, reconstruction_images=pool)
    calib_s, calib_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    logits, _ = logits_of(q, test)
    row = dict(label=label, preset=args.preset, bits=args.bits, overrides=overrides, recipe=recipe_key, limit=args.limit,
               images=len(labels), float_top1=100.0 * float((ref.argmax(-1) == labels).double().mean()),
               top1=100.0 * float((logits.argmax(-1) == labels).double().mean()),
               agreement=top1_agreement(ref, logits), kl=mean_kl(ref, logits), calib_s=round(calib_s, 1),
               calib_cpu_s=round(calib_cpu_s, 1), cpus=os.cpu_count(), load_before=load_before, cpu=cpu_name(),
               reconstruction_pool=len(pool) if pool is not None else 0,
               reconstruction=q.reconstruction_report.as_dict() if pool is not None else None)
    with open(results, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{label}: top1 {row['top1']:.1f} (float {row['float_top1']:.1f}) agreement {row['agreement']:.1f} "
          f"KL {row['kl']:.4f} calib {calib_s:.0f} s ({calib_cpu_s:.0f} CPU s on {row['cpus']} CPUs; load average "
          f"{load_before:.1f} before it) on {len(labels)} images; CPU: {row['cpu']}"
          + (f"; reconstruction pool {row['reconstruction_pool']} images, "
             f"restored as calibrated: {', '.join(q.reconstruction_report.restored()) or 'none'}" if pool is not None else ""))


if __name__ == "__main__":
    main()

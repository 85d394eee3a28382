"""Every model of the paper's tables (and ViT-Ti, DeiT-Ti, the Hugging Face ones) at full size, random init, through the whole pipeline.

For each model: build it with timm (``pretrained=False``: no download) or, for the Hugging Face
``transformers`` entries of the zoo, from their config (skipped without transformers), quantize it with two
random images and a short grid (``n_candidates`` candidates, one round), run the quantized model,
save a checkpoint and load it back (outputs must be bit-identical), export integer ONNX. One line
per model with the time of each step; a model that fails prints its error and the script goes on
(exit status 1 at the end if any did).

    python benchmarks/seed_models.py                       # all of them (the Base/384 ones need minutes each)
    python benchmarks/seed_models.py --models ViT-Ti/224 DeiT-Ti/224 --no-onnx

Times depend on the machine and on what else runs; compare them only within one run.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import timm
import torch

import ptq4vit
from ptq4vit.harness import zoo

#: The small models first, so a short run covers the most families.
SMALL_FIRST = ("Ti/", "S/", "T/", "B/")


def default_models() -> list[str]:
    """The paper's models (``zoo.paper_models``) plus ViT-Ti and DeiT-Ti, smallest first."""
    names = ["ViT-Ti/224", "DeiT-Ti/224"] + [n for n in zoo.paper_models() if n not in ("ViT-Ti/224", "DeiT-Ti/224")]
    names = sorted(names, key=lambda n: next((i for i, k in enumerate(SMALL_FIRST) if k in n), len(SMALL_FIRST)))
    try:
        import transformers  # noqa: F401
    except ImportError:
        return names
    return names + [e.short for e in zoo.MODELS if e.builder == "hf" and not e.weights_file]


def run_one(short: str, args, workdir: Path) -> dict:
    entry = zoo.resolve(short)
    times = {}
    t = time.perf_counter()
    if entry.builder == "hf":
        model = zoo.create(short, pretrained=False).model  # the zoo's architecture config, random weights
        size = tuple(entry.data_config["input_size"])
    else:
        torch.manual_seed(0)
        model = timm.create_model(entry.timm_name, pretrained=False, **entry.kwargs).eval()
        size = tuple(model.pretrained_cfg["input_size"])
    times["build"] = time.perf_counter() - t
    images = torch.randn(args.images, *size, generator=torch.Generator().manual_seed(1))

    t = time.perf_counter()
    q = ptq4vit.quantize(model, images, args.preset, args.bits, args.bits, progress=False,
                         n_candidates=args.candidates, rounds=1)
    times["quantize"] = time.perf_counter() - t

    t = time.perf_counter()
    with torch.no_grad():
        out = q(images)
    times["run"] = time.perf_counter() - t
    if not torch.isfinite(out).all():
        raise RuntimeError("the quantized model produced non-finite logits")

    t = time.perf_counter()
    path = workdir / f"{short.replace('/', '_')}.safetensors"
    ptq4vit.save(q, path)
    q2 = ptq4vit.load(path)
    with torch.no_grad():
        identical = torch.equal(q2(images), out)
    times["checkpoint"] = time.perf_counter() - t
    mib = path.stat().st_size / 2 ** 20
    path.unlink()
    if not identical:
        raise RuntimeError("the reloaded checkpoint is not bit-identical")

    if not args.no_onnx:
        from ptq4vit.export import export_onnx
        t = time.perf_counter()
        onnx_path = workdir / f"{short.replace('/', '_')}.onnx"
        # a preset without integer lowerings counts its fallbacks too
        rep = export_onnx(q, onnx_path, allow_float=True, input_size=size)
        times["onnx"] = time.perf_counter() - t
        times["onnx_float_fallbacks"] = len(rep.fallbacks)
        times["onnx_integer_sites"] = sum(s.integer for s in rep.sites)
        onnx_path.unlink()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return {"params_m": params, "sites": len(q.sites()), "checkpoint_mib": mib, **times}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=None, help="short names (default: the paper's, plus ViT-Ti and DeiT-Ti)")
    p.add_argument("--preset", default="ptq4vit")
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--candidates", type=int, default=4, help="n_candidates of the search grid (the preset's is 100)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models or default_models()
    print(f"# {args.preset} W{args.bits}A{args.bits}, {args.images} random images, {args.candidates} candidates, "
          f"1 round; torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads", flush=True)
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for short in models:
            t0 = time.perf_counter()
            try:
                r = run_one(short, args, Path(tmp))
            except Exception as e:  # noqa: BLE001 - report and go on to the next model
                failed.append(short)
                print(f"{short:12s} FAILED after {time.perf_counter() - t0:.1f} s: {type(e).__name__}: {e}", flush=True)
                traceback.print_exc(file=sys.stderr)
                continue
            onnx = "" if args.no_onnx else (f"  onnx {r['onnx']:6.1f} s ({r['onnx_integer_sites']} integer sites, "
                                            f"{r['onnx_float_fallbacks']} float fallback)")
            print(f"{short:14s} {r['params_m']:6.1f} M params {r['sites']:4d} sites  build {r['build']:5.1f} s  "
                  f"quantize {r['quantize']:6.1f} s  run {r['run']:5.2f} s  checkpoint {r['checkpoint']:5.1f} s "
                  f"({r['checkpoint_mib']:.0f} MiB, reload bit-identical){onnx}  total {time.perf_counter() - t0:6.1f} s",
                  flush=True)
    if failed:
        print(f"# failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

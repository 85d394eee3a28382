"""Every model of the paper's tables (and ViT-Ti, DeiT-Ti, one model of each family beyond timm's ViT/DeiT/Swin,
and the Hugging Face entries of the zoo when transformers is installed) at full size, random init, through
the whole pipeline.

For each model: build it with timm or its adapter (``pretrained=False``: no download), compare the wrapped
model with quantization off to the original's output (max |diff|, 0 where bit-identical), quantize it with two
random images and a short grid (``n_candidates`` candidates, one round), run the quantized model,
save a checkpoint and load it back (outputs must be bit-identical), export integer ONNX. One line
per model with the time of each step; a model that fails prints its error and the script goes on
(exit status 1 at the end if any did).

    python benchmarks/seed_models.py                       # all of them (the Base/384 ones need minutes each)
    python benchmarks/seed_models.py --models ViT-Ti/224 DeiT-Ti/224 --no-onnx
    python benchmarks/seed_models.py --models BEiT-B/224 SwinV2-T/256 EVA02-Ti/336 SigLIP-B/224 --preset deploy8 --bits 4

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
#: One full-size model of each family that is not one of timm's ViT/DeiT/Swin (built by its adapter).
OTHER_FAMILIES = ("vit_b_16", "swin_t", "swin_v2_t")


#: One model of each family beyond the paper's (BEiT, Swin V2, EVA-02, SigLIP tower), run after the paper's.
FAMILY_MODELS = ("BEiT-B/224", "SwinV2-T/256", "EVA02-Ti/336", "SigLIP-B/224")


def default_models() -> list[str]:
    """The paper's models (``zoo.paper_models``) plus ViT-Ti and DeiT-Ti, smallest first, then ``FAMILY_MODELS``."""
    names = ["ViT-Ti/224", "DeiT-Ti/224"] + [n for n in zoo.paper_models() if n not in ("ViT-Ti/224", "DeiT-Ti/224")]
    return sorted(names, key=lambda n: next((i for i, k in enumerate(SMALL_FIRST) if k in n), len(SMALL_FIRST))) \
        + list(OTHER_FAMILIES) + list(FAMILY_MODELS) + hf_models()



def hf_models() -> list[str]:
    """The zoo's Hugging Face entries with random weights (none without transformers)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return []
    return [e.short for e in zoo.MODELS if e.builder == "hf" and not e.weights_file]


def fill_zero_layers(model: torch.nn.Module) -> None:
    """Give linear layers initialised to all zeros (torchvision's classifier heads) seeded random weights:
    a zero head makes every logit zero, and then the checks below compare zeros."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and not m.weight.any():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)


def float_equivalence(model, images) -> float:
    """Largest |difference| between the wrapped model with quantization off (before calibration) and
    timm's own non-fused attention path: 0.0 where the wrapping is bit-identical."""
    import copy

    from timm.layers import set_fused_attn

    from ptq4vit.models import insert_quant_sites
    from ptq4vit.presets import get_preset
    from ptq4vit.quantized import QuantizedModel, model_name

    wrapped = copy.deepcopy(model)
    insert_quant_sites(wrapped, get_preset("ptq4vit"), 8, 8)
    qm = QuantizedModel(wrapped, get_preset("ptq4vit"), 8, 8, model_name(model))
    set_fused_attn(False)
    try:
        ref_model = copy.deepcopy(model)
        for m in ref_model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        with torch.no_grad(), qm.quantization_disabled():
            return float((qm(images) - ref_model(images)).abs().max())
    finally:
        set_fused_attn(True)


def run_one(short: str, args, workdir: Path) -> dict:
    times = {}
    t = time.perf_counter()
    lm = zoo.create(short, pretrained=False, init_seed=0)
    model = lm.model
    fill_zero_layers(model)
    times["build"] = time.perf_counter() - t
    size = tuple(lm.data_config["input_size"])
    images = torch.randn(args.images, *size, generator=torch.Generator().manual_seed(1))
    float_diff = float_equivalence(model, images)

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
    with torch.no_grad(), q.quantization_disabled():  # the wrapped (and, by a rotating preset, rotated) float model
        ref = model(images)
        times["float_rel"] = float((q(images) - ref).abs().max() / ref.abs().max())

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
        rep = export_onnx(q, onnx_path, input_size=size, allow_float=True)  # (a preset without integer lowerings
        times["onnx"] = time.perf_counter() - t                                # counts its fallbacks too)
        times["onnx_float_fallbacks"] = len(rep.fallbacks)
        times["onnx_integer_sites"] = sum(s.integer for s in rep.sites)
        onnx_path.unlink()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return {"params_m": params, "sites": len(q.sites()), "checkpoint_mib": mib, "float_diff": float_diff, **times}


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
            print(f"{short:14s} {r['params_m']:6.1f} M params {r['sites']:4d} sites  quantization off: max |diff| "
                  f"{r['float_diff']:.3g}  build {r['build']:5.1f} s  "
                  f"quantize {r['quantize']:6.1f} s  run {r['run']:5.2f} s  checkpoint {r['checkpoint']:5.1f} s "
                  f"({r['checkpoint_mib']:.0f} MiB, reload bit-identical)  quantization off vs float "
                  f"{r['float_rel']:.1e}{onnx}  total {time.perf_counter() - t0:6.1f} s",
                  flush=True)
    if failed:
        print(f"# failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

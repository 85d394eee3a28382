"""Every model of the paper's tables (and ViT-Ti, DeiT-Ti, one model of each family beyond timm's ViT/DeiT/Swin,
and the Hugging Face entries of the zoo when transformers is installed) at full size, random init, through
the whole pipeline, for each of the given presets and bit widths.

For each model: build it with timm or its adapter (``pretrained=False``: no download) and compare the wrapped
model with quantization off to the original's output (max |diff|, 0 where bit-identical): one line. Then for
each preset and bit width (WbAb): quantize it with two random images and a short grid (``n_candidates``
candidates, one round), run the quantized model (its logits must be finite), save a checkpoint and load it
back (outputs must be bit-identical), export the int8 ONNX graph each runtime runs (ONNX Runtime: contrib,
OpenVINO: QDQ), compile and run it there on the same images, and print the export's integer sites and the
product kernels the runtime runs in integers: one line. A preset the model's family refuses by name prints
``refused:`` and its message (not a failure); any other error prints ``FAILED`` and the script goes on
(exit status 1 at the end if any did).

    python benchmarks/seed_models.py                       # all of them, ptq4vit W8A8 (the Base/384 ones need minutes each)
    python benchmarks/seed_models.py --models ViT-Ti/224 DeiT-Ti/224 --no-onnx
    python benchmarks/seed_models.py --models BEiT-B/224 SwinV2-T/256 --presets ptq4vit rotq deploy8 --bits 8 4 --threads 1

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
from ptq4vit.errors import UserError
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


#: The runtimes an exported file runs on (:mod:`ptq4vit.export.runtimes`), each with its own int8 graph format.
RUNTIMES = ("onnxruntime", "openvino")


def build(short: str, n_images: int):
    """The float model (random init, zero heads filled) and ``n_images`` seeded random images of its input size."""
    lm = zoo.create(short, pretrained=False, init_seed=0)
    fill_zero_layers(lm.model)
    size = tuple(lm.data_config["input_size"])
    return lm.model, torch.randn(n_images, *size, generator=torch.Generator().manual_seed(1))


def run_on_runtimes(q, images: torch.Tensor, out: torch.Tensor, threads, workdir: Path, stem: str) -> dict:
    """Export ``q`` in each runtime's own int8 format, compile it there and run it on ``images`` (``out``: the
    torch model's logits): ``{runtime label: (format, integer sites, sites, integer kernels, rel. diff)}``,
    the diff being max |runtime - torch| / max |torch|."""
    from ptq4vit.export import export_onnx
    from ptq4vit.export.runtimes import get_runtime

    res = {}
    for name in RUNTIMES:
        rt = get_runtime(name)
        fmt = rt.formats[0]
        path = workdir / f"{stem}.{fmt}.onnx"
        # allow_float: a preset without integer lowerings still gets its file (its sites count as float)
        rep = export_onnx(q, path, format=fmt, input_size=tuple(images.shape[1:]), allow_float=True)
        loaded = rt.load(path, threads, "f32")
        got = torch.from_numpy(loaded.run(images.numpy()))
        if not torch.isfinite(got).all():
            raise RuntimeError(f"{rt.label} produced non-finite logits from the {fmt} file")
        rel = float((got - out).abs().max() / out.abs().max())
        res[rt.label] = (fmt, sum(s.integer for s in rep.sites), len(rep.sites), loaded.integer_kernels(), rel)
        del loaded
        path.unlink()
    return res


def run_preset(model, images, preset: str, bits: int, args, workdir: Path, stem: str) -> dict:
    """Quantize, run, round trip and (unless ``--no-onnx``) deploy one preset at WbAb; raises
    :class:`UserError` where the model's family refuses the preset."""
    times = {}
    t = time.perf_counter()
    q = ptq4vit.quantize(model, images, preset, bits, bits, progress=False, n_candidates=args.candidates, rounds=1)
    times["quantize"] = time.perf_counter() - t

    t = time.perf_counter()
    with torch.no_grad():
        out = q(images)
    times["run"] = time.perf_counter() - t
    if not torch.isfinite(out).all():
        raise RuntimeError("the quantized model produced non-finite logits")
    with torch.no_grad(), q.quantization_disabled():  # the wrapped (and, by a rotating preset, rotated) float model
        ref = model(images)
        float_rel = float((q(images) - ref).abs().max() / ref.abs().max())

    t = time.perf_counter()
    path = workdir / f"{stem}.safetensors"
    ptq4vit.save(q, path)
    q2 = ptq4vit.load(path)
    with torch.no_grad():
        identical = torch.equal(q2(images), out)
    times["checkpoint"] = time.perf_counter() - t
    mib = path.stat().st_size / 2 ** 20
    path.unlink()
    del q2
    if not identical:
        raise RuntimeError("the reloaded checkpoint is not bit-identical")

    runtimes = {}
    if not args.no_onnx:
        t = time.perf_counter()
        runtimes = run_on_runtimes(q, images, out, args.threads, workdir, stem)
        times["deploy"] = time.perf_counter() - t
    return {"sites": len(q.sites()), "checkpoint_mib": mib, "float_rel": float_rel, "runtimes": runtimes, **times}


def format_preset(r: dict) -> str:
    line = (f"{r['sites']:4d} sites  calibrated, logits finite  quantization off vs float {r['float_rel']:.1e}  "
            f"round trip bit-identical ({r['checkpoint_mib']:.0f} MiB)")
    for label, (fmt, n_int, n, kernels, rel) in r["runtimes"].items():
        what = "integer layers" if label == "OpenVINO" else "integer kernels"
        line += f"  {label} ({fmt}): {n_int}/{n} integer sites, {kernels} {what}, vs torch {rel:.1e}"
    line += f"  [quantize {r['quantize']:.1f} s, run {r['run']:.2f} s, checkpoint {r['checkpoint']:.1f} s"
    return line + (f", deploy {r['deploy']:.1f} s]" if "deploy" in r else "]")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=None, help="short names (default: the paper's, plus ViT-Ti and DeiT-Ti)")
    p.add_argument("--presets", "--preset", nargs="+", default=["ptq4vit"], help="presets, each run on every model")
    p.add_argument("--bits", nargs="+", type=int, default=[8], help="bit widths b, each run as WbAb")
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--candidates", type=int, default=4, help="n_candidates of the search grid (the preset's is 100)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export and the runtimes")
    p.add_argument("--threads", type=int, default=None, help="torch, ONNX Runtime and OpenVINO threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models or default_models()
    print(f"# {' '.join(args.presets)} at {' '.join(f'W{b}A{b}' for b in args.bits)}, {args.images} random images, "
          f"{args.candidates} candidates, 1 round; torch {torch.__version__}, timm {timm.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for short in models:
            t0 = time.perf_counter()
            try:
                model, images = build(short, args.images)
                float_diff = float_equivalence(model, images)
            except Exception as e:  # noqa: BLE001 - report and go on to the next model
                failed.append(short)
                print(f"{short:14s} FAILED after {time.perf_counter() - t0:.1f} s: {type(e).__name__}: {e}", flush=True)
                traceback.print_exc(file=sys.stderr)
                continue
            params = sum(p.numel() for p in model.parameters()) / 1e6
            print(f"{short:14s} {params:6.1f} M params  quantization off vs original: max |diff| {float_diff:.3g}  "
                  f"[build {time.perf_counter() - t0:.1f} s]", flush=True)
            for preset in args.presets:
                for bits in args.bits:
                    head = f"{short:14s} {preset:8s} W{bits}A{bits}"
                    t = time.perf_counter()
                    try:
                        r = run_preset(model, images, preset, bits, args, Path(tmp),
                                       f"{short.replace('/', '_')}_{preset}_{bits}")
                    except UserError as e:  # the family refuses the preset by name: not a failure
                        print(f"{head}  refused: {e}", flush=True)
                        continue
                    except Exception as e:  # noqa: BLE001 - report and go on
                        failed.append(f"{short} {preset} W{bits}A{bits}")
                        print(f"{head}  FAILED after {time.perf_counter() - t:.1f} s: {type(e).__name__}: {e}",
                              flush=True)
                        traceback.print_exc(file=sys.stderr)
                        continue
                    print(f"{head}  {format_preset(r)}", flush=True)
            del model, images
    if failed:
        print(f"# failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

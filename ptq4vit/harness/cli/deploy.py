"""``ptq4vit deploy``, ``ptq4vit export``, ``ptq4vit bench`` and ``ptq4vit eval --checkpoint``.

Each command works on a checkpoint written by :func:`ptq4vit.save` (or ``ptq4vit quantize --save``).

    ptq4vit deploy q.safetensors --runtime openvino --data-dir ../shared/data/cifar10/test --limit 10
    ptq4vit deploy q.safetensors --model vit_s14_cifar10 --weights ../shared/models --data-dir ...
    ptq4vit export --checkpoint q.safetensors --out q_int8.onnx --float-out q_fp32.onnx
    ptq4vit bench  --checkpoint q.safetensors --data-dir ../shared/data/cifar10/test --limit 10
    ptq4vit eval   --checkpoint q.safetensors --data-dir ../shared/data/cifar10/test --limit 100

``--format qdq`` writes the standard QuantizeLinear/DequantizeLinear graph; ``--openvino f32``
(or ``default``, OpenVINO's own float precision) adds OpenVINO to ``bench`` and runs ``eval
--onnx`` on it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Optional

from ...errors import UserError
from .common import (
    Command,
    add_model_args,
    create_float_model,
    describe_float_model,
    distinct_outputs,
    input_file,
    input_folder,
    log,
    make_parent,
    output_file,
    output_folder,
    parse_int_list,
)


def _need_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise UserError(f"this command needs onnx and onnxruntime (pip install 'ptq4vit[export]'): {e}") from None


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="FILE",
                   help="a quantized checkpoint written by ptq4vit (safetensors)")


def _load(path: str):
    from ...checkpoint import load, read_metadata
    qmodel = load(path)
    return qmodel, read_metadata(path)


def _images(meta: dict, qmodel, data_dir: str, limit: Optional[int], strict: bool = False):
    """(dataset, images tensor, labels) of an image folder, with the checkpoint's eval transform."""
    import torch

    from ...checkpoint import data_config
    from ..data import ImageFolder, eval_transform, make_loader

    cfg = data_config(meta, qmodel)
    ds = ImageFolder(data_dir, eval_transform(cfg), strict=strict, limit_per_class=limit, what="image folder")
    xs, ys = [], []
    for batch in make_loader(ds, batch_size=100):
        if batch.images is not None:
            xs.append(batch.images)
            ys.append(batch.labels)
    if not xs:
        raise UserError(f"no readable images in {data_dir}")
    return ds, torch.cat(xs), torch.cat(ys).numpy()


@contextlib.contextmanager
def _allow_float_switch():
    """An int8 export with no site in integers names the command line's switch for it."""
    from ...export.report import AllFloatError
    try:
        yield
    except AllFloatError as e:
        raise AllFloatError(e.what, "--allow-float") from None


def _allow_float_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-float", action="store_true",
                   help="write the int8 graph even when no quantization site runs in integers in it (refused otherwise)")


def _progress(args) -> bool:
    """Progress bars on stderr unless --no-progress or -q."""
    return not args.no_progress and getattr(args, "verbosity", 0) >= 0


# --------------------------------------------------------------------------- deploy


def deploy_args(p: argparse.ArgumentParser) -> None:
    from ...export.openvino import PRECISIONS
    from ...export.runtimes import RUNTIMES
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a quantized checkpoint written by ptq4vit (safetensors)")
    p.add_argument("--runtime", choices=list(RUNTIMES), default="onnxruntime",
                   help="where the file is compiled, checked and timed (CPU) (default: %(default)s)")
    p.add_argument("--out", metavar="FILE", help="int8 ONNX file to write (default: CHECKPOINT's name with "
                                                 "_<runtime>.onnx)")
    p.add_argument("--float-out", metavar="FILE", help="also keep the float32 ONNX graph it is compared with here")
    p.add_argument("--format", default=None, help="int8 graph: contrib or qdq on onnxruntime (default: contrib), "
                                                  "qdq on openvino (see export)")
    p.add_argument("--precision", choices=PRECISIONS, default="f32",
                   help="OpenVINO's float layers: f32, bf16, or default (the plugin's choice) (default: %(default)s)")
    _allow_float_arg(p)
    g = p.add_argument_group("check and timing")
    g.add_argument("--data-dir", required=True, metavar="DIR", help="class folders of evaluation images")
    g.add_argument("--limit", type=int, metavar="N", help="first N images of each class (default: all)")
    g.add_argument("--batch-size", type=int, default=64,
                   help="batch size of the check and of the timed runs (default: %(default)s)")
    g.add_argument("--workers", type=int, default=0, help="data-loading processes (default: %(default)s)")
    g.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping it")
    g.add_argument("--repeats", type=int, default=5, help="timed runs of each graph; the median is shown "
                                                          "(default: %(default)s)")
    g.add_argument("--threads", type=int, default=None, help="runtime threads (default: the runtime's choice)")
    g.add_argument("--no-torch", action="store_true", help="do not also run the fake-quantized torch model")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    # the options quantize was given: the float32 graph and every figure against float are then of the
    # original float model, not of the dequantized checkpoint
    add_model_args(p, title="float model it was quantized from (optional, as given to quantize)", optional=True)


#: The footnote's advice when deploy ran without the float model.
HOW_TO_PASS_FLOAT = ("to compare with the original, pass the float model as quantize was given it "
                     "(--model NAME and --weights PATH, or --random-init --init-seed N; --model-kwargs JSON)")


def cmd_deploy(args) -> int:
    from ...checkpoint import data_config
    from ..data import ImageFolder, eval_transform
    from ..deployment import deploy, format_deployment
    for flag, v in (("--limit", args.limit), ("--batch-size", args.batch_size), ("--repeats", args.repeats)):
        if v is not None and v < 1:
            raise UserError(f"{flag} must be at least 1, got {v}")
    ckpt = input_file(args.checkpoint, "checkpoint")
    input_folder(args.data_dir, "--data-dir folder")
    out = Path(args.out) if args.out else ckpt.with_name(f"{ckpt.stem}_{args.runtime}.onnx")
    output_file(out, "--out file")
    if args.float_out:
        output_file(args.float_out, "--float-out file")
    distinct_outputs(**{"--checkpoint": ckpt, "--out": out, "--float-out": args.float_out})
    _need_onnx()
    qmodel, meta = _load(args.checkpoint)
    float_lm = create_float_model(args)
    float_name = None
    if float_lm is not None:  # refused here, before any file or folder is written
        from ..deployment import check_float_model
        float_name = f"--model {describe_float_model(float_lm, args.init_seed)}"
        check_float_model(qmodel, float_lm.model, float_name, f"the checkpoint {ckpt}")
    ds = ImageFolder(args.data_dir, eval_transform(data_config(meta, qmodel)), strict=args.strict,
                     limit_per_class=args.limit, what="image folder")
    for f in (out, args.float_out):
        if f is not None:
            make_parent(f)
    with _allow_float_switch():
        res = deploy(qmodel, ds, args.runtime, out, float_out=args.float_out, format=args.format,
                     precision=args.precision, allow_float=args.allow_float, batch_size=args.batch_size,
                     num_workers=max(0, args.workers), repeats=args.repeats, threads=args.threads,
                     with_torch=not args.no_torch, progress=_progress(args), log=log,
                     float_model=None if float_lm is None else float_lm.model, float_name=float_name or "")
    print(format_deployment(res, args.data_dir, HOW_TO_PASS_FLOAT))
    return 0


# --------------------------------------------------------------------------- export


def _format_arg(p: argparse.ArgumentParser) -> None:
    from ...export.onnx import FORMATS
    p.add_argument("--format", choices=FORMATS, default="contrib",
                   help="int8 graph: contrib (ONNX Runtime's integer GEMMs) or qdq (standard QuantizeLinear/"
                        "DequantizeLinear, for ONNX Runtime, OpenVINO, TensorRT) (default: %(default)s)")


def _openvino_arg(p: argparse.ArgumentParser, what: str) -> None:
    from ...export.openvino import PRECISIONS
    p.add_argument("--openvino", choices=PRECISIONS, default=None, metavar="PRECISION",
                   help=f"{what} OpenVINO with float layers at this precision: f32, bf16, or default (the plugin's "
                        "choice: bf16 on CPUs with AVX512-BF16/AMX); needs pip install 'ptq4vit[openvino]'")


def export_args(p: argparse.ArgumentParser) -> None:
    from ...export.onnx import GEMM_MODES, TWIN_COMBINES
    _checkpoint_args(p)
    p.add_argument("--out", required=True, metavar="FILE", help="int8 ONNX file to write")
    _format_arg(p)
    p.add_argument("--float-out", metavar="FILE", help="also write the float32 ONNX graph of the same model here")
    p.add_argument("--batch-size", type=int, default=None, help="fixed batch size (default: dynamic)")
    p.add_argument("--gemm", choices=GEMM_MODES, default="portable",
                   help="int8 GEMM flavour: portable (exact on every x86 CPU), vnni (u8 x s8 everywhere: exact and "
                        "fastest with AVX512-VNNI/AVX-VNNI, wrong on AVX2-only CPUs), auto (vnni if this CPU has it) "
                        "(default: %(default)s)")
    p.add_argument("--twin-combine", choices=TWIN_COMBINES, default="gemm",
                   help="how the two integer products of a twin quantizer meet: in the GEMMs' output scales, or an "
                        "int32 shift-add (default: %(default)s)")
    _allow_float_arg(p)
    p.add_argument("--check", type=int, default=8, metavar="N",
                   help="run N random inputs through ONNX Runtime and the torch model and print the difference "
                        "(0: skip; default: %(default)s)")


def cmd_export(args) -> int:
    _need_onnx()
    from ...export.onnx import export_onnx
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.check < 0:
        raise UserError(f"--check must be 0 (skip) or a number of inputs, got {args.check}")
    input_file(args.checkpoint, "checkpoint")
    output_file(args.out, "--out file")
    if args.float_out:
        output_file(args.float_out, "--float-out file")
    distinct_outputs(**{"--checkpoint": args.checkpoint, "--out": args.out, "--float-out": args.float_out})
    qmodel, _ = _load(args.checkpoint)
    for f in (args.out, args.float_out):
        if f:
            make_parent(f)
    with _allow_float_switch():
        rep = export_onnx(qmodel, args.out, batch_size=args.batch_size, gemm=args.gemm, twin_combine=args.twin_combine,
                          format=args.format, allow_float=args.allow_float)
    print(rep.summary())
    if args.float_out:
        export_onnx(qmodel, args.float_out, int8=False, batch_size=args.batch_size)
        print(f"{args.float_out}: float32 ONNX (quantizers off; weights are the checkpoint's dequantized ones)")
    if args.check:
        import torch

        from ...export.bench import compare_outputs
        from ...export.ort import INTEGER_OPS, make_session, optimized_op_counts
        n = args.batch_size or args.check
        x = torch.randn(n, *rep.input_shape[1:], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = qmodel(x).numpy()
        out = make_session(args.out).run(None, {"input": x.numpy()})[0]
        c = compare_outputs(ref, out)
        ops = optimized_op_counts(args.out)
        ints = {k: v for k, v in ops.items() if k in INTEGER_OPS}
        print(f"check on {n} random inputs: max |logit error| vs the fake-quantized torch model "
              f"{c['max_abs_logit_error']:.3g} (max |logit| {c['max_abs_logit']:.3g}), top-1 agreement "
              f"{c['top1_agreement']:.1f}%; integer kernels ORT runs: {ints}")
    return 0


# --------------------------------------------------------------------------- bench


def bench_args(p: argparse.ArgumentParser) -> None:
    from ...export.onnx import GEMM_MODES
    _checkpoint_args(p)
    p.add_argument("--data-dir", metavar="DIR", help="class folders of evaluation images (top-1 and agreement)")
    p.add_argument("--limit", type=int, metavar="N", help="first N images of each class (default: all)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes to time (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for ORT and torch (default: theirs)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs of each variant (default: %(default)s)")
    p.add_argument("--providers", default=None,
                   help="comma-separated ORT providers: cpu, cuda (default: every one available)")
    p.add_argument("--gemm", choices=GEMM_MODES, default="portable", help="int8 GEMM flavour (see export)")
    _format_arg(p)
    _openvino_arg(p, "also time and score the float32 and QDQ int8 graphs on")
    p.add_argument("--onnx-dir", metavar="DIR", help="keep the exported ONNX files here (default: a temporary folder)")
    p.add_argument("--no-torch", action="store_true", help="do not time the fake-quantized torch model")
    p.add_argument("--no-spin", action="store_true",
                   help="ORT threads do not busy-wait between operators (better when other processes share the cores)")
    p.add_argument("--profile", action="store_true",
                   help="also print ONNX Runtime's time per operator of both ONNX Runtime graphs at the largest batch")
    _allow_float_arg(p)
    p.add_argument("--json", metavar="FILE", help="write the numbers as JSON")


def cmd_bench(args) -> int:
    _need_onnx()
    from ...export.bench import CPU, RUNTIME_OF, benchmark, format_bench, op_breakdown
    from ...export.ort import available_providers
    sizes = parse_int_list(args.batch_sizes, "batch sizes")
    if any(b < 1 for b in sizes):
        raise UserError("batch sizes must be at least 1")
    if args.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {args.repeats}")
    names = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
    providers = None
    if args.providers:
        providers = []
        for p in args.providers.split(","):
            p = p.strip()
            full = names.get(p.lower(), p)
            if full not in available_providers():
                raise UserError(f"ORT provider {p!r} is not available here (available: {', '.join(available_providers())})")
            providers.append(full)
    input_file(args.checkpoint, "checkpoint")
    if args.data_dir:
        input_folder(args.data_dir, "--data-dir folder")
    if args.onnx_dir:
        output_folder(args.onnx_dir, "--onnx-dir folder")
    if args.json:
        output_file(args.json, "--json file")
        distinct_outputs(**{"--checkpoint": args.checkpoint, "--json": args.json})
    qmodel, meta = _load(args.checkpoint)
    images = labels = None
    if args.data_dir:
        _, images, labels = _images(meta, qmodel, args.data_dir, args.limit)
        log(f"{len(images)} images from {args.data_dir}")
    with _allow_float_switch():
        res = benchmark(qmodel, images=images, labels=labels, batch_sizes=sizes, providers=providers,
                        threads=args.threads, repeats=args.repeats, include_torch=not args.no_torch,
                        workdir=args.onnx_dir, gemm=args.gemm, spinning=not args.no_spin, format=args.format,
                        openvino=args.openvino, allow_float=args.allow_float, log=log)
    print(res.int8_report.summary())
    print(format_bench(res))
    if args.profile:
        # ONNX Runtime's profiler, on the graphs ONNX Runtime ran (OpenVINO's graph is not profiled here)
        b = max(sizes)
        for k in ("float32-onnx", "int8-onnx"):
            print(f"where the time goes, {k} on ONNX Runtime (CPUExecutionProvider), batch {b}:")
            print(op_breakdown(res.onnx_paths[k], res.int8_report.input_shape[1:], b, threads=args.threads))
    if args.json:
        out = {"model": res.model, "threads": res.threads, "openvino_precision": res.openvino_precision,
               "timings": res.timings, "accuracy": res.accuracy,
               "agreement": res.agreement, "fallbacks": [s.__dict__ for s in res.int8_report.fallbacks],
               "ratios": {f"{p}:{b}": res.ratio(p, b) for p, b in sorted({(r["provider"], r["batch"]) for r in res.timings
                                                                          if r["runtime"] == RUNTIME_OF["int8-onnx"]})},
               "openvino_ratios": {str(b): res.ratio(CPU, b, runtime="openvino") for b in sizes}}
        make_parent(args.json)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


# --------------------------------------------------------------------------- eval --checkpoint


def eval_args(p: argparse.ArgumentParser) -> None:
    _checkpoint_args(p)
    p.add_argument("--data-dir", required=True, metavar="DIR", help="class folders of evaluation images")
    p.add_argument("--limit", type=int, metavar="N", help="first N images of each class (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default: %(default)s)")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes (default: %(default)s)")
    p.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--onnx", metavar="FILE", help="evaluate this exported ONNX graph (ONNX Runtime, CPU) instead")
    _openvino_arg(p, "run the --onnx graph (a qdq or float32 export) on")


def cmd_eval_checkpoint(args) -> int:
    from ...checkpoint import data_config
    from ..data import ImageFolder, eval_transform
    from ..evaluate import evaluate
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if args.openvino and not args.onnx:
        raise UserError("--openvino runs an exported graph: give it with --onnx FILE")
    input_file(args.checkpoint, "checkpoint")
    input_folder(args.data_dir, "--data-dir folder")
    if args.onnx:
        input_file(args.onnx, "--onnx file")
        if not args.openvino:
            _need_onnx()
    qmodel, meta = _load(args.checkpoint)
    if args.onnx:  # the file must be this checkpoint's export, for images of the size the checkpoint takes
        from ...export.provenance import check_exported_from
        check_exported_from(args.onnx, qmodel, f"the checkpoint {args.checkpoint}",
                            input_size=data_config(meta, qmodel).get("input_size"))
    ds = ImageFolder(args.data_dir, eval_transform(data_config(meta, qmodel)), strict=args.strict,
                     limit_per_class=args.limit, what="image folder")
    model = qmodel
    what = f"{qmodel.name} {meta['preset']['name']} W{qmodel.w_bits}A{qmodel.a_bits} (fake-quantized torch)"
    if args.onnx and args.openvino:
        from ...export.openvino import compile_onnx
        ov = compile_onnx(args.onnx, args.openvino)
        model = _NumpyModule(ov.run)
        what = f"{args.onnx} (OpenVINO, float layers in {ov.precision})"
    elif args.onnx:
        from ...export.ort import make_session
        session = make_session(args.onnx)
        model = _NumpyModule(lambda x: session.run(None, {"input": x})[0])
        what = f"{args.onnx} (ONNX Runtime)"
    res = evaluate(model, ds, batch_size=args.batch_size, num_workers=max(0, args.workers), progress=_progress(args),
                   desc="eval")
    print(f"{what}: top-1 {res.top1:.2f}% on {res.total} images"
          + (f" ({res.skipped} unreadable skipped)" if res.skipped else ""))
    return 0


class _NumpyModule:
    """Just enough of an nn.Module for :func:`ptq4vit.harness.evaluate.evaluate`: a runtime's
    ``images -> logits`` on numpy arrays (ONNX Runtime or OpenVINO, CPU)."""

    def __init__(self, run):
        import torch

        self.run = run
        self._dummy = torch.zeros(())

    def eval(self):
        return self

    def parameters(self):
        return iter([self._dummy])

    def buffers(self):
        return iter([])

    def __call__(self, x):
        import torch
        return torch.from_numpy(self.run(x.cpu().numpy()))


COMMANDS = (
    Command("deploy", "export a checkpoint for a runtime (ONNX Runtime or OpenVINO), re-check its top-1 and agreement "
            "with float there on evaluation images, time it against the float model, show where every site runs",
            cmd_deploy, deploy_args),
    Command("export", "write a quantized checkpoint as ONNX with integer kernels (and its float32 graph)",
            cmd_export, export_args),
    Command("bench", "ONNX Runtime (and OpenVINO) speed, float32 vs int8 vs fake-quant torch, and agreement of a checkpoint",
            cmd_bench, bench_args),
    Command("eval", "top-1 of a quantized checkpoint (torch, or its ONNX export on ONNX Runtime or OpenVINO) on an image folder",
            cmd_eval_checkpoint, eval_args),
)

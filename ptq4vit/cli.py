"""The ``ptq4vit`` command line.

Subcommands are registered with :func:`command`: one function that runs it, and one that adds its
arguments (shared argument groups: :func:`add_model_args`, :func:`add_data_args`,
:func:`add_run_args`). A :class:`~ptq4vit.errors.UserError` raised anywhere is printed as one line
``ptq4vit: error: ...`` and the command exits with status 2.

    ptq4vit quantize --model ViT-S/224 --data /imagenet --bits W6A6 --preset base,ptq4vit
    ptq4vit sweep    --data /imagenet --models ViT-S/224,DeiT-S/224 --bits W8A8,W6A6
    ptq4vit ablation --data /imagenet --models ViT-S/224 --bits W8A8,W6A6
    ptq4vit report   runs/results.jsonl --out runs/report
    torchrun --nproc-per-node 4 -m ptq4vit quantize ...   # evaluation sharded over 4 GPUs
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable, Optional

from .errors import UserError

#: name -> (help, add_arguments(parser), run(args) -> exit code)
COMMANDS: dict[str, tuple[str, Optional[Callable], Callable]] = {}


def command(name: str, help: str, args: Optional[Callable[[argparse.ArgumentParser], None]] = None):
    """Register ``run(args) -> int`` as subcommand ``name``; ``args(parser)`` adds its options."""
    def deco(run: Callable) -> Callable:
        COMMANDS[name] = (help, args, run)
        return run
    return deco


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as a single line and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"ptq4vit: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- shared arguments


def add_model_args(p: argparse.ArgumentParser, multi: bool = False, default_models: Optional[str] = None) -> None:
    g = p.add_argument_group("model")
    if multi:
        g.add_argument("--models", default=default_models,
                       help="comma-separated model names: the paper's short names (ViT-S/224, DeiT-B/384, Swin-T/224 "
                            "...), timm names with a pretrained tag, or vit_s14_cifar10 (default: %(default)s)")
    else:
        g.add_argument("--model", required=True,
                       help="a short name (ViT-S/224, DeiT-B/384, Swin-T/224, vit_s14_cifar10 ...) or a timm name "
                            "(arch or arch.tag); `ptq4vit models` lists the short names")
    g.add_argument("--weights", metavar="PATH",
                   help="local weights: a safetensors or torch state-dict file, or a folder holding <model>.safetensors; "
                        "no model hub is contacted")
    g.add_argument("--random-init", action="store_true",
                   help="randomly initialised model (no weights; for smoke tests)")
    g.add_argument("--init-seed", type=int, default=0, help="seed of --random-init (default: %(default)s)")
    g.add_argument("--model-kwargs", metavar="JSON", default=None,
                   help='extra timm.create_model options as JSON, e.g. \'{"img_size": 32, "depth": 2}\'')


def add_data_args(p: argparse.ArgumentParser, calib_sizes: bool = False) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="ROOT", help="dataset root with val/ and train/ class folders (ImageNet layout)")
    g.add_argument("--val-split", default="val", help="evaluation split under ROOT (default: %(default)s)")
    g.add_argument("--calib-split", default="train",
                   help="split under ROOT to draw calibration images from (default: %(default)s)")
    g.add_argument("--val-dir", metavar="DIR", help="evaluation folder, instead of ROOT/<val-split>")
    g.add_argument("--calib-dir", metavar="DIR", help="calibration folder, instead of ROOT/<calib-split>")
    if calib_sizes:
        g.add_argument("--calib-sizes", default="32", help="comma-separated calibration sizes (default: %(default)s)")
    else:
        g.add_argument("--calib-size", type=int, default=32, help="calibration images (default: %(default)s)")
    g.add_argument("--calib-seed", type=int, default=3,
                   help="seed of the draw numpy.random.seed(s); permutation(n)[:size] (default: %(default)s)")
    g.add_argument("--limit", type=int, metavar="N",
                   help="evaluate only the first N images of each class (sorted file order; default: all)")
    g.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping it")


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs", help="output folder for results and qparams (default: %(default)s)")
    g.add_argument("--results", metavar="FILE", help="results JSONL file (default: OUT/results.jsonl)")
    g.add_argument("--device", default="auto",
                   help="auto, cpu, cuda or cuda:N (under torchrun: each rank's own GPU) (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default: %(default)s)")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="data-loading processes (default: %(default)s)")
    g.add_argument("--memory-budget", metavar="SIZE",
                   help="memory for calibration captures, e.g. 8G (default: the engine's choice)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-reuse-float", action="store_true",
                   help="re-evaluate the float model even when the results file has its accuracy")


def add_preset_args(p: argparse.ArgumentParser, default: str = "ptq4vit", multi_help: str = "") -> None:
    from .presets import PRESETS
    g = p.add_argument_group("method")
    g.add_argument("--preset", "--presets", dest="preset", default=default,
                   help=f"comma-separated presets: {', '.join(PRESETS)} (default: %(default)s){multi_help}")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a preset field, e.g. --set metric=cosine --set softmax_twin=false (repeatable)")


def _split(text: Optional[str]) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set expects FIELD=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        k, v = k.strip().replace("-", "_"), v.strip()
        if v.lower() in ("true", "yes", "on"):
            val = True
        elif v.lower() in ("false", "no", "off"):
            val = False
        else:
            try:
                val = int(v)
            except ValueError:
                try:
                    val = float(v)
                except ValueError:
                    val = v
        out[k] = val
    return out


def parse_size(text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgGtT]?)[iI]?[bB]?\s*", text)
    if not m:
        raise UserError(f"cannot read memory size {text!r}: write it like 8G or 512M")
    mult = {"": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(t) for t in _split(text)]
    except ValueError:
        raise UserError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals:
        raise UserError(f"no {what} given")
    return vals


def run_options(args) -> "RunOptions":
    from .runner import RunOptions
    kwargs = {}
    if args.model_kwargs:
        try:
            kwargs = json.loads(args.model_kwargs)
        except ValueError as e:
            raise UserError(f"--model-kwargs is not valid JSON: {e}") from None
        if not isinstance(kwargs, dict):
            raise UserError("--model-kwargs must be a JSON object")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.weights and args.random_init:
        raise UserError("--weights and --random-init exclude each other")
    return RunOptions(data=args.data, val_split=args.val_split, calib_split=args.calib_split, val_dir=args.val_dir,
                      calib_dir=args.calib_dir, limit_per_class=args.limit, strict=args.strict, weights=args.weights,
                      random_init=args.random_init, init_seed=args.init_seed, model_kwargs=kwargs,
                      batch_size=args.batch_size, num_workers=max(0, args.workers), device=args.device,
                      out=args.out, results=args.results, progress=not args.no_progress,
                      memory_budget=parse_size(args.memory_budget), reuse_float=not args.no_reuse_float)


def _check_output(opts) -> None:
    from .results import ensure_writable_dir
    ensure_writable_dir(opts.out)
    rp = opts.results_path
    if rp.parent != Path(opts.out):
        ensure_writable_dir(rp.parent)
    if rp.exists() and not rp.is_file():
        raise UserError(f"results file {rp} is not a file")


def _setup_device(opts):
    """Join a torchrun process group if launched by torchrun; this process's device."""
    from .evaluate import init_distributed
    try:
        return init_distributed(opts.device)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"bad --device {opts.device!r}: {str(e).splitlines()[0]}") from None


def _log(msg: str) -> None:
    from .evaluate import is_main_process
    if is_main_process():
        print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- quantize


def _quantize_args(p):
    add_model_args(p)
    add_data_args(p)
    add_preset_args(p, multi_help="; several run one after the other on the same float model")
    g = p.add_argument_group("bits")
    g.add_argument("--bits", default=None, help="bit settings, e.g. W8A8 or W6A6,W8A8 (default: W8A8)")
    g.add_argument("--w-bits", type=int, help="weight bits (2..8), with --a-bits instead of --bits")
    g.add_argument("--a-bits", type=int, help="activation bits (2..8)")
    add_run_args(p)


def _bit_settings(args) -> list[tuple[int, int]]:
    from .runner import check_bits, parse_bits
    if args.w_bits is not None or args.a_bits is not None:
        if args.bits:
            raise UserError("give either --bits or --w-bits/--a-bits")
        w = args.w_bits if args.w_bits is not None else args.a_bits
        a = args.a_bits if args.a_bits is not None else args.w_bits
        check_bits(w, a)
        return [(w, a)]
    return [parse_bits(b) for b in _split(args.bits or "W8A8")] or [(8, 8)]


@command("quantize", "calibrate one model, evaluate float and quantized top-1, write results and qparams",
         _quantize_args)
def cmd_quantize(args) -> int:
    from .runner import Job, Planner, Runner, check_preset, format_rows, run_serial
    opts = run_options(args)
    bits = _bit_settings(args)
    presets = _split(args.preset)
    if not presets:
        raise UserError("no preset given")
    overrides = parse_overrides(args.overrides)
    for pr in presets:
        check_preset(pr, overrides)
    jobs = [Job(args.model, pr, w, a, args.calib_size, args.calib_seed, overrides) for pr in presets for (w, a) in bits]
    planner = Planner(opts)
    for job in jobs:
        planner.resolve(job)
    _check_output(opts)
    device = _setup_device(opts)
    runner = Runner(opts, planner, device, log=_log)
    rows = run_serial(runner, jobs, replace=True)
    if runner.rank == 0:
        print(format_rows(rows))
        print(f"\nresults: {opts.results_path}")
        for r in rows:
            print(f"qparams: {r.get('qparams')}")
    return 0


# --------------------------------------------------------------------------- sweep / ablation


def _sweep_common(p, default_models: str, default_bits: str):
    add_model_args(p, multi=True, default_models=default_models)
    add_data_args(p, calib_sizes=True)
    p.add_argument("--bits", default=default_bits, help="comma-separated bit settings (default: %(default)s)")
    add_run_args(p)
    g = p.add_argument_group("sweep")
    g.add_argument("--devices", default=None,
                   help="spread runs over these devices, one worker process each: 'all' (every visible GPU) or a "
                        "list like cuda:0,cuda:1 or cpu,cpu")
    g.add_argument("--jobs", type=int, default=None, help="worker processes (with --devices all: at most one per GPU)")
    g.add_argument("--force", action="store_true", help="run again what the results file already has")
    g.add_argument("--dry-run", action="store_true", help="list the runs still to do and stop")


def _sweep_args(p):
    from .zoo import paper_models
    _sweep_common(p, ",".join(paper_models()), "W8A8,W6A6")
    add_preset_args(p, default="base,ptq4vit")


def _ablation_args(p):
    _sweep_common(p, "ViT-S/224,ViT-B/224,ViT-B/384", "W8A8,W6A6")
    from .presets import PRESETS
    g = p.add_argument_group("ablation")
    g.add_argument("--preset", default="ptq4vit",
                   help=f"preset the rows modify: {', '.join(PRESETS)}; 'official' is the released code "
                        f"(default: %(default)s)")
    g.add_argument("--rows", default="1,2,3,4,5,6", help="ablation rows to run (default: %(default)s)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="further preset overrides applied to every row")


def _devices(args) -> list[str]:
    import torch
    spec = args.devices
    if spec is None:
        return ["cpu"] * args.jobs if args.jobs and args.jobs > 1 else []
    if spec == "all":
        n = torch.cuda.device_count()
        if n == 0:
            raise UserError("--devices all: no GPU is visible (use --devices cpu,cpu or --jobs N for CPU workers)")
        devs = [f"cuda:{i}" for i in range(n)]
    else:
        devs = _split(spec)
        for d in devs:
            if not re.fullmatch(r"cpu|cuda:\d+", d):
                raise UserError(f"bad device {d!r} in --devices: use cpu or cuda:N")
            if d.startswith("cuda") and int(d.split(":")[1]) >= torch.cuda.device_count():
                raise UserError(f"device {d} is not visible ({torch.cuda.device_count()} GPUs)")
    if args.jobs:
        devs = devs[: args.jobs] if len(devs) >= args.jobs else [devs[i % len(devs)] for i in range(args.jobs)]
    return devs


def _run_sweep(args, jobs) -> int:
    from .evaluate import dist_info
    from .results import ResultsFile
    from .runner import Planner, Runner, format_rows, pending_jobs, run_parallel, run_serial
    opts = run_options(args)
    planner = Planner(opts)
    results = ResultsFile(opts.results_path)
    if not args.dry_run:
        _check_output(opts)
    todo = pending_jobs(planner, jobs, results, force=args.force)
    devices = _devices(args)
    if os.environ.get("WORLD_SIZE", "1") != "1" and devices:
        raise UserError("--devices/--jobs cannot be combined with torchrun (torchrun already shards evaluation)")
    _log(f"{len(jobs)} runs in this sweep, {len(jobs) - len(todo)} already in {opts.results_path}, {len(todo)} to run")
    if args.dry_run:
        for job, key in todo:
            print(f"{key}  {job.label()}")
        return 0
    if not todo:
        return 0
    todo_jobs = [j for j, _ in todo]
    if len(devices) > 1:
        rows, errors = run_parallel(opts, todo_jobs, devices,
                                    on_row=lambda r: _log(f"done: {r['model']} {r['preset']} W{r['w_bits']}A{r['a_bits']} "
                                                          f"-> {r['quant_top1']:.2f}"))
        if rows:
            print(format_rows(rows))
        for e in errors:
            print(f"ptq4vit: error: {e}", file=sys.stderr)
        return 1 if errors else 0
    if len(devices) == 1:
        opts.device = devices[0]
    device = _setup_device(opts)
    runner = Runner(opts, planner, device, log=_log)
    rows = run_serial(runner, todo_jobs, replace=args.force)
    if dist_info()[0] == 0:
        print(format_rows(rows))
        print(f"\nresults: {opts.results_path}")
    return 0


@command("sweep", "models x presets x bit settings x calibration sizes, resumable (the paper's test_all.py)",
         _sweep_args)
def cmd_sweep(args) -> int:
    from .runner import Job, check_preset, parse_bits
    models = _split(args.models)
    presets = _split(args.preset)
    if not models:
        raise UserError("no models given (--models)")
    if not presets:
        raise UserError("no presets given (--presets)")
    bits = [parse_bits(b) for b in _split(args.bits)]
    sizes = parse_int_list(args.calib_sizes, "calibration sizes")
    overrides = parse_overrides(args.overrides)
    for pr in presets:
        check_preset(pr, overrides)
    jobs = [Job(m, pr, w, a, n, args.calib_seed, overrides)
            for m in models for n in sizes for pr in presets for (w, a) in bits]
    return _run_sweep(args, jobs)


@command("ablation", "the six ablation rows of the paper's README (its test_ablation.py), resumable", _ablation_args)
def cmd_ablation(args) -> int:
    from .presets import ABLATION_ROWS
    from .runner import Job, check_preset, parse_bits
    models = _split(args.models)
    if not models:
        raise UserError("no models given (--models)")
    rows = parse_int_list(args.rows, "ablation rows")
    for r in rows:
        if r not in ABLATION_ROWS:
            raise UserError(f"no ablation row {r}; rows are {', '.join(map(str, ABLATION_ROWS))}")
    bits = [parse_bits(b) for b in _split(args.bits)]
    sizes = parse_int_list(args.calib_sizes, "calibration sizes")
    extra = parse_overrides(args.overrides)
    jobs = []
    for m in models:
        for n in sizes:
            for r in rows:
                ov = {**ABLATION_ROWS[r][1], **extra}
                check_preset(args.preset, ov)
                for (w, a) in bits:
                    jobs.append(Job(m, args.preset, w, a, n, args.calib_seed, ov, ablation_row=r))
    return _run_sweep(args, jobs)


# --------------------------------------------------------------------------- report


def _report_args(p):
    p.add_argument("results", nargs="*", default=["runs/results.jsonl"],
                   help="results JSONL files (default: %(default)s)")
    p.add_argument("--out", default=None, help="report folder (default: <folder of the first results file>/report)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    g = p.add_argument_group("activation plot")
    g.add_argument("--activations", action="store_true",
                   help="also plot one block's post-softmax and post-GELU activations with the chosen grid "
                        "(re-creates the run's float model and calibration images)")
    g.add_argument("--run", default=None,
                   help="which run: a key (or its prefix) or an index into the results (default: the last run)")
    g.add_argument("--layer", default=None, help="block name (blocks.5) or index (default: the middle block)")
    g.add_argument("--act-images", type=int, default=8, help="calibration images to run through (default: %(default)s)")
    g.add_argument("--weights", default=None, help="weights file/folder, when the run's path is not valid here")
    g.add_argument("--calib-dir", default=None, help="calibration folder, when the run's path is not valid here")


def _pick_run(rows: list[dict], which: Optional[str]) -> dict:
    if which is None:
        return rows[-1]
    if re.fullmatch(r"-?\d+", which) and len(which) < 6:
        i = int(which)
        if not -len(rows) <= i < len(rows):
            raise UserError(f"run index {i} out of range: {len(rows)} runs")
        return rows[i]
    hits = [r for r in rows if str(r.get("key", "")).startswith(which)]
    if len(hits) != 1:
        raise UserError(f"run {which!r} matches {len(hits)} runs; give a longer key or an index")
    return hits[0]


def plot_run_activations(row: dict, path, layer=None, n_images: int = 8, weights=None, calib_dir=None) -> Path:
    """Re-create a run's float model and calibration images and draw its activation plot."""
    from . import zoo
    from .data import ImageFolder, calibration_images
    from .results import plot_activations
    w = weights or row.get("weights")
    qpath = row.get("qparams")
    if not qpath or not Path(qpath).is_file():
        raise UserError(f"the run's quantization parameters {qpath} are missing")
    qparams = json.loads(Path(qpath).read_text())
    lm = zoo.create(row["model"], weights=None if w in ("hub", "random-init") else w, pretrained=w == "hub",
                    model_kwargs=row.get("model_kwargs") or {}, init_seed=row.get("init_seed") or 0)
    ds = ImageFolder(calib_dir or row["calib_dir"], lm.transform(), what="calibration folder")
    n = max(1, min(n_images, int(row.get("calib_size") or n_images)))
    cal = calibration_images(ds, n, int(row.get("calib_seed", 3)))
    return plot_activations(lm.model, cal.images, qparams, path, layer,
                            title=f"{row['model']} {row['preset']} W{row['w_bits']}A{row['a_bits']}")


@command("report", "Markdown/CSV/JSON tables beside the paper's numbers, and plots", _report_args)
def cmd_report(args) -> int:
    from .results import load_rows, write_report
    rows = load_rows(args.results)
    out = Path(args.out) if args.out else Path(args.results[0]).parent / "report"
    written = write_report(rows, out, plots=not args.no_plots)
    if args.activations:
        row = _pick_run(rows, args.run)
        name = f"activations_{re.sub(r'[^A-Za-z0-9.]+', '-', row['model'])}_{row['preset']}_W{row['w_bits']}A{row['a_bits']}.png"
        written["activations"] = plot_run_activations(row, out / name, args.layer, args.act_images,
                                                      weights=args.weights, calib_dir=args.calib_dir)
    print((out / "report.md").read_text())
    for k, v in written.items():
        print(f"{k}: {v}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- models


@command("models", "list the named models (the paper's short names and their pinned timm names)")
def cmd_models(args) -> int:
    from .zoo import describe_models
    print(describe_models())
    return 0


# --------------------------------------------------------------------------- export, bench, eval --checkpoint

from .export.cli_commands import register as _register_export_commands  # noqa: E402

_register_export_commands(command)


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ptq4vit", description="Post-training quantization of vision transformers "
                                                 "(BasePTQ and PTQ4ViT) on timm models.")
    try:
        from importlib.metadata import version
        ver = version("ptq4vit")
    except Exception:
        ver = "0.1.0"
    parser.add_argument("--version", action="version", version=f"ptq4vit {ver}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_, add_args, _) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        if add_args is not None:
            add_args(sp)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    run = COMMANDS[args.command][2]
    try:
        return int(run(args) or 0)
    except UserError as e:
        print(f"ptq4vit: error: {e}", file=sys.stderr, flush=True)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("ptq4vit: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        from .evaluate import shutdown_distributed
        shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())

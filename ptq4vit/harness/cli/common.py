"""What the commands share: the parser class, argument groups, value parsing, run options."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
from pathlib import Path
from typing import Optional

from ...errors import UserError

logger = logging.getLogger("ptq4vit.cli")


class Command:
    """A subcommand: its name, one-line help, ``add_arguments(parser)`` and ``run(args) -> exit code``."""

    def __init__(self, name: str, help: str, run, add_arguments=None):
        self.name, self.help, self.run, self.add_arguments = name, help, run, add_arguments


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors as a single line and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"ptq4vit: error: {message} (see {self.prog} --help)\n")


def add_model_args(p: argparse.ArgumentParser, multi: bool = False, default_models: Optional[str] = None,
                   title: str = "model", optional: bool = False) -> None:
    """The options that build a float model (``--model``, ``--weights``, ``--random-init`` ...); ``optional``:
    ``--model`` may be left out (then the others must be too, see :func:`create_float_model`)."""
    g = p.add_argument_group(title)
    if multi:
        g.add_argument("--models", default=default_models,
                       help="comma-separated model names: the paper's short names (ViT-S/224, DeiT-B/384, Swin-T/224 "
                            "...), timm names with a pretrained tag, or vit_s14_cifar10 (default: %(default)s)")
    else:
        g.add_argument("--model", required=not optional,
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
    from ...presets import PRESETS
    g = p.add_argument_group("method")
    g.add_argument("--preset", "--presets", dest="preset", default=default,
                   help=f"comma-separated presets: {', '.join(PRESETS)} (default: %(default)s){multi_help}")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override a recipe path, e.g. --set calibration.alpha=0.3 --set softmax=log "
                        "--set transforms.rotation.seed=1, or a flat preset field (--set metric=cosine); "
                        "repeatable, see docs/cli.md")


def split_list(text: Optional[str]) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def parse_overrides(items: list[str]) -> dict:
    """``--set PATH=VALUE`` items as recipe overrides, each value typed by the recipe path's (or the flat
    preset field's) declared type."""
    from ...presets import parse_field
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set expects FIELD=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        out[k] = parse_field(k, v)
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
        vals = [int(t) for t in split_list(text)]
    except ValueError:
        raise UserError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals:
        raise UserError(f"no {what} given")
    return vals


def parse_model_kwargs(text: Optional[str]) -> dict:
    """``--model-kwargs JSON`` as a dict (empty when not given)."""
    if not text:
        return {}
    try:
        kwargs = json.loads(text)
    except ValueError as e:
        raise UserError(f"--model-kwargs is not valid JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise UserError("--model-kwargs must be a JSON object")
    return kwargs


def create_float_model(args):
    """The float model the options of :func:`add_model_args` name, built as ``quantize`` builds it
    (:func:`ptq4vit.harness.zoo.create`), or None when ``--model`` is not given (an option that only
    qualifies ``--model`` is then refused)."""
    from .. import zoo
    if args.model is None:
        given = [f for f, v in (("--weights", args.weights), ("--random-init", args.random_init),
                                ("--model-kwargs", args.model_kwargs)) if v]
        if given:
            raise UserError(f"{', '.join(given)} describe the float model: give --model NAME too")
        return None
    if args.weights and args.random_init:
        raise UserError("--weights and --random-init exclude each other")
    return zoo.create(args.model, weights=args.weights, pretrained=not args.random_init,
                      model_kwargs=parse_model_kwargs(args.model_kwargs), init_seed=args.init_seed)


def describe_float_model(lm, init_seed: int) -> str:
    """A float model built by :func:`create_float_model`, in words: name and where its weights came from."""
    source = {"hub": "pretrained weights from the hub", "random-init": f"random init, seed {init_seed}"}
    return f"{lm.name} ({source.get(lm.weights, f'weights {lm.weights}')})"


def run_options(args):
    from ..runner import RunOptions
    kwargs = parse_model_kwargs(args.model_kwargs)
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


# ---- file and folder arguments: checked before anything is read or written


def input_file(path, what: str) -> Path:
    """``path`` names an existing, readable file; UserError naming ``what`` and the path otherwise."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} {p} does not exist")
    if not p.is_file():
        raise UserError(f"{what} {p} is not a file")
    if not os.access(p, os.R_OK):
        raise UserError(f"{what} {p} is not readable")
    return p


def input_folder(path, what: str) -> Path:
    """``path`` names an existing folder; UserError naming ``what`` and the path otherwise."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} {p} does not exist")
    if not p.is_dir():
        raise UserError(f"{what} {p} is not a folder")
    return p


def _cannot_write_in(folder: Path) -> Optional[str]:
    """Why files cannot be written in ``folder`` (existing, or to be created), or None if they can."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is read-only"
    return None


def output_folder(path, what: str) -> Path:
    """``path`` is a folder that exists or can be created, and can be written in. Nothing is created here:
    missing folders are made when the command writes (:func:`make_parent`, ``mkdir``)."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{what} {p} is not a folder")
    why = _cannot_write_in(p)
    if why is not None:
        raise UserError(f"cannot write in {what} {p}: {why}")
    return p


def output_file(path, what: str) -> Path:
    """``path`` is a file that can be written: not a folder, in a folder that exists or can be created and
    is writable. Nothing is created here."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{what} {p} is a folder; give a file name")
    if p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"{what} {p} is not writable")
    why = _cannot_write_in(p.parent)
    if why is not None:
        raise UserError(f"cannot write {what} {p}: {why}")
    return p


def distinct_outputs(**paths) -> None:
    """Refuse two arguments naming one file (one would overwrite the other, or an input)."""
    seen: dict = {}
    for flag, path in paths.items():
        if path is None:
            continue
        key = Path(path).expanduser().resolve()
        if key in seen:
            raise UserError(f"{seen[key]} and {flag} name the same file {path}")
        seen[key] = flag


def make_parent(path) -> None:
    """Create the folder of an output file checked by :func:`output_file`."""
    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)


def check_output(opts) -> None:
    from ..store import ensure_writable_dir
    rp = opts.results_path
    output_folder(opts.out, "output folder")
    output_file(rp, "results file")
    ensure_writable_dir(opts.out)
    if rp.parent != Path(opts.out):
        ensure_writable_dir(rp.parent)


def check_hub_weights(planner, models) -> None:
    """Before anything is written: refuse at once models whose hub weights are not cached and cannot be fetched."""
    from ..zoo import check_hub_weights as check
    for name in dict.fromkeys(models):
        entry, weights, _ = planner.model_identity(name)
        if weights == "hub":
            check(entry)


def add_save_arg(p: argparse.ArgumentParser, folder_only: bool = False) -> None:
    if folder_only:
        what = "write the checkpoint of every run this sweep makes into folder PATH"
    else:
        what = ("write the checkpoint of every run (safetensors; for export, deploy, eval): with one run PATH is the "
                "file (or an existing folder to write it into), with several runs a folder")
    p.add_argument("--save", metavar="PATH", help=f"{what}; each file in a folder is named "
                   "<model>_<preset>_<bits>_c<calib size>_s<calib seed>_<run key>.safetensors, like its qparams file")


def check_save(opts, n_runs: int, folder_only: bool = False) -> None:
    """Check ``--save`` before any work and decide whether it names a file or a folder
    (``opts.save_folder``); a UserError, with nothing written, where it cannot be used."""
    from ..store import ensure_writable_dir
    if opts.save is None:
        return
    p = Path(opts.save).expanduser()
    opts.save_folder = folder_only or n_runs > 1 or p.is_dir()
    if opts.save_folder:
        if p.exists() and not p.is_dir():
            why = "a sweep" if folder_only else f"{n_runs} runs"
            raise UserError(f"--save {p} is a file, but {why} need a folder (one checkpoint per run)")
        folder = output_folder(p, "--save folder")
    else:
        folder = output_file(p, "--save file").parent
    if folder.exists():
        ensure_writable_dir(folder)  # a write in it, as the checkpoint will: os.access does not see every refusal


def setup_device(opts):
    """Join a torchrun process group if launched by torchrun; this process's device."""
    from ..evaluate import init_distributed
    try:
        return init_distributed(opts.device)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"bad --device {opts.device!r}: {str(e).splitlines()[0]}") from None


def log(msg: str) -> None:
    """A progress message on stderr (rank 0 only under torchrun); ``-q`` hides it."""
    from ..evaluate import is_main_process
    if is_main_process():
        logger.info(msg)



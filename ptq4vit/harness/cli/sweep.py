"""``ptq4vit sweep`` and ``ptq4vit ablation``: many runs, resumable, on one or several devices."""
from __future__ import annotations

import os
import re
import sys

from ...errors import UserError
from .common import (
    Command,
    add_data_args,
    add_model_args,
    add_preset_args,
    add_run_args,
    add_save_arg,
    check_hub_weights,
    check_output,
    check_save,
    log,
    parse_int_list,
    parse_overrides,
    run_options,
    setup_device,
    split_list,
)


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
    add_save_arg(g, folder_only=True)


def _sweep_args(p):
    from ..zoo import paper_models
    _sweep_common(p, ",".join(paper_models()), "W8A8,W6A6")
    add_preset_args(p, default="base,ptq4vit")


def _ablation_args(p):
    _sweep_common(p, "ViT-S/224,ViT-B/224,ViT-B/384", "W8A8,W6A6")
    from ...presets import PRESETS
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
        devs = split_list(spec)
        for d in devs:
            if not re.fullmatch(r"cpu|cuda:\d+", d):
                raise UserError(f"bad device {d!r} in --devices: use cpu or cuda:N")
            if d.startswith("cuda") and int(d.split(":")[1]) >= torch.cuda.device_count():
                raise UserError(f"device {d} is not visible ({torch.cuda.device_count()} GPUs)")
    if args.jobs:
        devs = devs[: args.jobs] if len(devs) >= args.jobs else [devs[i % len(devs)] for i in range(args.jobs)]
    return devs


def _run_sweep(args, jobs) -> int:
    from ..evaluate import dist_info
    from ..runner import (
        Planner,
        Runner,
        format_rows,
        pending_jobs,
        run_parallel,
        run_serial,
    )
    from ..store import ResultsFile
    opts = run_options(args)
    planner = Planner(opts)
    results = ResultsFile(opts.results_path)
    opts.save = args.save
    check_save(opts, len(jobs), folder_only=True)
    if not args.dry_run:
        check_hub_weights(planner, [job.model for job in jobs])
        check_output(opts)
    todo, stale = pending_jobs(planner, jobs, results, force=args.force)
    for job, changed in stale:
        log(f"{job.label()}: its stored result was made by another definition of preset {job.preset!r} "
            f"(fields {', '.join(changed)} differ): running it again")
    devices = _devices(args)
    if os.environ.get("WORLD_SIZE", "1") != "1" and devices:
        raise UserError("--devices/--jobs cannot be combined with torchrun (torchrun already shards evaluation)")
    log(f"{len(jobs)} runs in this sweep, {len(jobs) - len(todo)} already in {opts.results_path}, {len(todo)} to run")
    replace = args.force or bool(stale)  # the only stored rows a pending job's key can meet are forced or stale
    if args.dry_run:
        for job, key in todo:
            print(f"{key}  {job.label()}")
        return 0
    if not todo:
        return 0
    todo_jobs = [j for j, _ in todo]
    if len(devices) > 1:
        rows, errors = run_parallel(opts, todo_jobs, devices,
                                    on_row=lambda r: log(f"done: {r['model']} {r['preset']} W{r['w_bits']}A{r['a_bits']} "
                                                          f"-> {r['quant_top1']:.2f}"), replace=replace)
        if rows:
            print(format_rows(rows))
        return _report_failures(errors, len(todo_jobs))
    if len(devices) == 1:
        opts.device = devices[0]
    device = setup_device(opts)
    runner = Runner(opts, planner, device, log=log)
    errors: list[str] = []
    rows = run_serial(runner, todo_jobs, replace=replace, errors=errors)
    if dist_info()[0] != 0:
        return 1 if errors else 0
    if rows:
        print(format_rows(rows))
        print(f"\nresults: {opts.results_path}")
    return _report_failures(errors, len(todo_jobs))


def _report_failures(errors: list[str], n_jobs: int) -> int:
    """List the runs that failed (the others are in the results file); exit status 1 if any did."""
    if not errors:
        return 0
    print(f"ptq4vit: error: {len(errors)} of {n_jobs} runs failed:", file=sys.stderr)
    for e in errors:
        print(f"ptq4vit: error:   {e}", file=sys.stderr)
    return 1


def cmd_sweep(args) -> int:
    from ..runner import Job, check_preset, parse_bits
    models = split_list(args.models)
    presets = split_list(args.preset)
    if not models:
        raise UserError("no models given (--models)")
    if not presets:
        raise UserError("no presets given (--presets)")
    bits = [parse_bits(b) for b in split_list(args.bits)]
    sizes = parse_int_list(args.calib_sizes, "calibration sizes")
    overrides = parse_overrides(args.overrides)
    for pr in presets:
        check_preset(pr, overrides)
    jobs = [Job(m, pr, w, a, n, args.calib_seed, overrides)
            for m in models for n in sizes for pr in presets for (w, a) in bits]
    return _run_sweep(args, jobs)


def cmd_ablation(args) -> int:
    from ..ablations import ABLATION_ROWS
    from ..runner import Job, check_preset, parse_bits
    models = split_list(args.models)
    if not models:
        raise UserError("no models given (--models)")
    rows = parse_int_list(args.rows, "ablation rows")
    for r in rows:
        if r not in ABLATION_ROWS:
            raise UserError(f"no ablation row {r}; rows are {', '.join(map(str, ABLATION_ROWS))}")
    bits = [parse_bits(b) for b in split_list(args.bits)]
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


COMMANDS = (
    Command("sweep", "models x presets x bit settings x calibration sizes, resumable (the paper's test_all.py)",
            cmd_sweep, _sweep_args),
    Command("ablation", "the six ablation rows of the paper's README (its test_ablation.py), resumable",
            cmd_ablation, _ablation_args),
)

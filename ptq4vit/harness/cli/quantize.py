"""``ptq4vit quantize``: calibrate one model with one or more presets and bit settings."""
from __future__ import annotations

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
    parse_overrides,
    run_options,
    setup_device,
    split_list,
)


def _quantize_args(p):
    add_model_args(p)
    add_data_args(p)
    add_preset_args(p, multi_help="; several run one after the other on the same float model")
    g = p.add_argument_group("bits")
    g.add_argument("--bits", default=None, help="bit settings, e.g. W8A8 or W6A6,W8A8 (default: W8A8)")
    g.add_argument("--w-bits", type=int, help="weight bits (2..8), with --a-bits instead of --bits")
    g.add_argument("--a-bits", type=int, help="activation bits (2..8)")
    add_run_args(p)
    add_save_arg(p.add_argument_group("checkpoint"))


def _bit_settings(args) -> list[tuple[int, int]]:
    from ..runner import check_bits, parse_bits
    if args.w_bits is not None or args.a_bits is not None:
        if args.bits:
            raise UserError("give either --bits or --w-bits/--a-bits")
        w = args.w_bits if args.w_bits is not None else args.a_bits
        a = args.a_bits if args.a_bits is not None else args.w_bits
        check_bits(w, a)
        return [(w, a)]
    return [parse_bits(b) for b in split_list(args.bits or "W8A8")] or [(8, 8)]


def cmd_quantize(args) -> int:
    from ..runner import Job, Planner, Runner, check_preset, format_rows, run_serial
    opts = run_options(args)
    bits = _bit_settings(args)
    presets = split_list(args.preset)
    if not presets:
        raise UserError("no preset given")
    overrides = parse_overrides(args.overrides)
    for pr in presets:
        check_preset(pr, overrides)
    jobs = [Job(args.model, pr, w, a, args.calib_size, args.calib_seed, overrides) for pr in presets for (w, a) in bits]
    planner = Planner(opts)
    for job in jobs:
        planner.resolve(job)
    opts.save = args.save
    check_save(opts, len(jobs))
    check_hub_weights(planner, [args.model])
    check_output(opts)
    device = setup_device(opts)
    runner = Runner(opts, planner, device, log=log)
    rows = run_serial(runner, jobs, replace=True)
    if runner.rank == 0:
        print(format_rows(rows))
        print(f"\nresults: {opts.results_path}")
        for r in rows:
            print(f"qparams: {r.get('qparams')}")
        for r in rows:
            if r.get("checkpoint"):
                print(f"checkpoint: {r['checkpoint']}")
    return 0


COMMANDS = (
    Command("quantize", "calibrate one model, evaluate float and quantized top-1, write results and qparams "
            "(and each run's checkpoint with --save)",
            cmd_quantize, _quantize_args),
)

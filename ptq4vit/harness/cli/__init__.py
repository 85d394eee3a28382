"""The ``ptq4vit`` command line: one module per command group, composed here.

    ptq4vit quantize --model ViT-S/224 --data /imagenet --bits W6A6 --preset base,ptq4vit
    ptq4vit sweep    --data /imagenet --models ViT-S/224,DeiT-S/224 --bits W8A8,W6A6
    ptq4vit ablation --data /imagenet --models ViT-S/224 --bits W8A8,W6A6
    ptq4vit report   runs/results.jsonl --out runs/report
    ptq4vit export   --checkpoint q.safetensors --out q.onnx
    torchrun --nproc-per-node 4 -m ptq4vit quantize ...   # evaluation sharded over 4 GPUs

A :class:`~ptq4vit.errors.UserError` is printed as one line ``ptq4vit: error: ...`` (exit status 2);
any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Optional

from ... import __version__
from ...errors import UserError
from . import deploy, models, quantize, report, sweep
from ..logs import configure_logging
from .common import Parser

COMMANDS = {c.name: c for group in (quantize, sweep, report, models, deploy) for c in group.COMMANDS}


def build_parser() -> Parser:
    parser = Parser(prog="ptq4vit", description="Post-training quantization of vision transformers "
                                                 "(BasePTQ and PTQ4ViT) on timm models.")
    parser.add_argument("--version", action="version", version=f"ptq4vit {__version__}")
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1, default=0,
                      help="also show the library's detailed log messages")
    loud.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1,
                      help="only results, warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for c in COMMANDS.values():
        sp = sub.add_parser(c.name, help=c.help, description=c.help)
        if c.add_arguments is not None:
            c.add_arguments(sp)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    configure_logging(args.verbosity)
    run = COMMANDS[args.command].run
    try:
        return int(run(args) or 0)
    except UserError as e:
        print(f"ptq4vit: error: {e}", file=sys.stderr, flush=True)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("ptq4vit: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        from ..evaluate import shutdown_distributed
        shutdown_distributed()


"""The paper's example/test_all.py: every model x preset x bit setting x calibration size.

A thin wrapper around ``ptq4vit sweep`` (same options; see ``--help``). Resumable: re-run the same
command after an interruption and only the missing runs are done.

    python examples/test_all.py --data /data/imagenet --out runs/paper
"""
import sys

from ptq4vit.harness.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))

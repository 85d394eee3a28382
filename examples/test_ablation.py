"""The paper's example/test_ablation.py: the six ablation rows (metric x twin quantizers).

A thin wrapper around ``ptq4vit ablation`` (same options; see ``--help``). Resumable.

    python examples/test_ablation.py --data /data/imagenet --preset official --out runs/ablation
"""
import sys

from ptq4vit.harness.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablation", *sys.argv[1:]]))

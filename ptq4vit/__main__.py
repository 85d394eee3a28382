"""``python -m ptq4vit`` (also what ``torchrun -m ptq4vit`` runs): the command line."""
import sys

from .harness.cli import main

sys.exit(main())

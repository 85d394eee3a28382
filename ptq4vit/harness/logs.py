"""Where log messages go: the command line and its worker processes print ptq4vit's loggers on stderr."""
from __future__ import annotations

import logging
import sys


def configure_logging(verbosity: int = 0) -> None:
    """``-1`` (``-q``): warnings only; ``0``: progress messages; ``1`` (``-v``): the library's details too."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if verbosity < 1 else "%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("ptq4vit")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False

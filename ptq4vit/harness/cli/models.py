"""``ptq4vit models``: the named models."""
from __future__ import annotations

from .common import Command


def cmd_models(args) -> int:
    from ..zoo import describe_models
    print(describe_models())
    return 0


COMMANDS = (
    Command("models", "list the named models (the paper's short names and their pinned timm names)",
            cmd_models),
)

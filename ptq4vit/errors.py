"""The one error hierarchy of ptq4vit.

Everything the library raises on purpose derives from :class:`PTQ4ViTError`. Bad input that
a user can fix (a wrong path, an unknown model structure, bits out of range, a checkpoint that
does not match) is a :class:`UserError`; the command line prints it as one line
``ptq4vit: error: ...`` and exits with status 2. Any other exception is a bug and is shown
with its traceback. ``UserError`` is also a ``ValueError`` so that callers that catch the
built-in keep working.
"""
from __future__ import annotations


class PTQ4ViTError(Exception):
    """Base class of every error ptq4vit raises on purpose."""


class UserError(PTQ4ViTError, ValueError):
    """Bad input that the user can fix; its message is complete and fits on one line."""

    exit_code = 2

    def __str__(self) -> str:  # keep the CLI's promise of one line
        return " ".join(line.strip() for line in super().__str__().splitlines() if line.strip())


class UnsupportedModelError(UserError):
    """The model, or one of its modules, has no quantization adapter (the message names it)."""


class CheckpointError(UserError):
    """A checkpoint cannot be written or loaded faithfully (the message says why)."""

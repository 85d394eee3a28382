"""User-facing errors.

:class:`UserError` is raised for anything a user can fix (a wrong path, an unknown model name,
bits out of range ...). The command line prints it as one line ``ptq4vit: error: ...`` and
exits with status 2, without a traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input that the user can fix; its message is complete and fits on one line."""

    exit_code = 2

    def __str__(self) -> str:  # keep the CLI's promise of one line
        return " ".join(line.strip() for line in super().__str__().splitlines() if line.strip())

"""Writing a file so that readers see either the previous file or the complete new one.

:func:`atomic_write` writes into a temporary file next to the target and renames it over the
target at the end; :func:`atomic_path` does the same for writers that take a file name. The
temporary file is created the way ``open(path, "w")`` creates a file: permission bits ``0o666``
less the process umask (or, when the target exists, the target's bits), so a checkpoint or a report is as readable as any other file the user writes
(``tempfile.mkstemp`` would make it ``0o600``). On any failure, a full disk, an unwritable
folder or Ctrl-C included, the temporary file is removed and the previous file is left as it
was; ``OSError`` becomes one line naming the file and the cause.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from typing import BinaryIO, Callable, Iterator, Union

from .errors import UserError

PathLike = Union[str, "os.PathLike[str]"]


def _fail(error: type[UserError], what: str, path: str, cause: str) -> UserError:
    return error(f"cannot write {what} {path}: {cause}")


@contextlib.contextmanager
def atomic_path(path: PathLike, *, what: str = "file", error: type[UserError] = UserError) -> Iterator[str]:
    """Yield a temporary file name next to ``path``, for a writer that takes a file name
    (``torch.onnx.export``, ``onnx.save``); when the block ends, the file written there is synced
    and replaces ``path`` (keeping the permission bits of a file it replaces). On any failure the
    temporary file is removed and ``path`` is left as it was; ``OSError`` becomes one ``error`` line
    naming ``what`` and ``path``, anything else (``KeyboardInterrupt``) propagates unchanged.
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    if os.path.isdir(path):
        raise _fail(error, what, path, "it is a folder; give a file name")
    if not os.path.isdir(folder):
        raise _fail(error, what, path, f"the folder {folder} does not exist" if not os.path.exists(folder)
                    else f"{folder} is not a folder")
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        if os.path.isfile(path):  # replacing a file keeps its permission bits, as open(path, "w") does
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _fail(error, what, path, e.strerror or str(e)) from None
        raise


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None], *, what: str = "file",
                 error: type[UserError] = UserError) -> None:
    """Create or replace ``path`` with what ``write(f)`` writes into a binary file object ``f``
    (:func:`atomic_path`, the temporary file created as ``open(path, "w")`` creates a file).

    ``what`` names the file in error messages ("checkpoint", "qparams JSON" ...); ``error`` is
    the :class:`~ptq4vit.errors.UserError` subclass raised for a target that cannot be written.
    ``KeyboardInterrupt`` and any other exception that is not an ``OSError`` propagate unchanged
    (after the cleanup).
    """
    with atomic_path(path, what=what, error=error) as tmp:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            write(f)


def atomic_write_bytes(path: PathLike, data: bytes, **kwargs) -> None:
    """:func:`atomic_write` of ``data``."""
    atomic_write(path, lambda f: f.write(data), **kwargs)


def atomic_write_text(path: PathLike, text: str, **kwargs) -> None:
    """:func:`atomic_write` of ``text`` as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"), **kwargs)

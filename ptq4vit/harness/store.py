"""The results store: an append-only JSONL file of finished runs.

:class:`ResultsFile` appends each run as one line with a single ``write`` + ``flush`` + ``fsync``
under a lock, so a killed sweep leaves at most a partial last line, which readers ignore and the
next append cuts off. Every row carries a ``key`` (the hash of what defines the run); a resumed
sweep skips keys already present, so nothing is lost or counted twice.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

from ..atomic_write import atomic_write_bytes
from ..errors import UserError


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def run_key(identity: dict) -> str:
    """A short stable hash of the fields that define a run (model, weights, preset, bits, data ...)."""
    return hashlib.sha256(canonical(identity).encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- the JSONL file


class ResultsFile:
    """An append-only JSONL file of runs, safe against killed writers and concurrent appenders."""

    def __init__(self, path):
        self.path = Path(path)

    # ---- reading
    def _parse(self, data: bytes) -> tuple[list[dict], int]:
        """Rows, and the byte length of the well-formed prefix (a trailing partial line excluded)."""
        rows, good_end, pos = [], 0, 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            end = len(data) if nl < 0 else nl
            line = data[pos:end].strip()
            if line:
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                if isinstance(row, dict):
                    rows.append(row)
                    good_end = end + 1 if nl >= 0 else end
                elif nl < 0:
                    break  # a partial last line from a killed writer: ignored
                else:
                    good_end = end + 1  # a corrupt line in the middle: skipped, kept in the file
            elif nl >= 0:
                good_end = end + 1
            if nl < 0:
                break
            pos = nl + 1
        return rows, good_end

    def rows(self) -> list[dict]:
        """All complete rows, in file order (a partial last line is ignored)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except IsADirectoryError:
            raise UserError(f"results file {self.path} is a folder") from None
        except OSError as e:
            raise UserError(f"cannot read results file {self.path}: {e.strerror or e}") from None
        return self._parse(data)[0]

    def by_key(self) -> dict[str, dict]:
        """The stored row of each key (the last one written)."""
        return {r["key"]: r for r in self.rows() if r.get("key")}

    # ---- writing
    @contextlib.contextmanager
    def _locked(self):
        import fcntl
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name("." + self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def append(self, row: dict, *, replace: bool = False) -> bool:
        """Append ``row`` (which must have a ``key``) as one line. An existing row with that key is kept
        and ``False`` returned, unless ``replace``, which rewrites the file (atomically) without it."""
        key = row.get("key")
        if not key:
            raise ValueError("a results row needs a 'key'")
        line = (json.dumps(row, sort_keys=False, default=str) + "\n").encode()
        try:
            with self._locked():
                try:
                    data = self.path.read_bytes()
                except FileNotFoundError:
                    data = b""
                rows, good_end = self._parse(data)
                if any(r.get("key") == key for r in rows):
                    if not replace:
                        return False
                    kept = b"".join((json.dumps(r, default=str) + "\n").encode() for r in rows if r.get("key") != key)
                    atomic_write_bytes(self.path, kept + line, what="results file")
                    return True
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    if good_end < len(data):
                        os.ftruncate(fd, good_end)  # cut off a partial last line left by a killed writer
                    prefix = b"\n" if good_end and not data[:good_end].endswith(b"\n") else b""
                    os.lseek(fd, 0, os.SEEK_END)
                    _write_all(fd, prefix + line)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                return True
        except OSError as e:
            raise UserError(f"cannot write results file {self.path}: {e.strerror or e}") from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def ensure_writable_dir(path) -> Path:
    """Create ``path`` if needed and check that files can be written in it; UserError otherwise."""
    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {p}: {e.strerror or e}") from None
    if not p.is_dir():
        raise UserError(f"output folder {p} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise UserError(f"output folder {p} is not writable: {e.strerror or e}") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"output folder {p} is not writable")
    return p


def latest_by_key(rows: Iterable[dict]) -> list[dict]:
    """One row per key (the last one), in first-seen order."""
    out: "OrderedDict[str, dict]" = OrderedDict()
    for r in rows:
        out[r.get("key") or id(r)] = r
    return list(out.values())


def load_rows(paths: Sequence) -> list[dict]:
    rows = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise UserError(f"results file {p} does not exist")
        rows.extend(ResultsFile(p).rows())
    return latest_by_key(rows)



"""Checkpoints, qparams JSON and reports are written whole or not at all, as readable as the umask says.

Failures a test cannot cause for real as root (a read-only folder, a full disk) are simulated by
making the system call raise the error the kernel would.
"""
import errno
import os
import stat

import pytest

import ptq4vit
from ptq4vit import checkpoint as ck
from ptq4vit.checkpoint import CheckpointError
from ptq4vit.errors import UserError

from _fastq import fast_quantize
from test_checkpoint import float_model, images


@pytest.fixture(scope="module")
def q():
    m = float_model("vit", depth=1)
    return fast_quantize(m, images(m), "ptq4vit", 8, 8)


@pytest.fixture
def umask():
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _write_report(folder):
    from test_results import _row
    from ptq4vit.harness import report
    return report.write_report([_row("1")], folder, plots=False)


WRITERS = {
    "checkpoint": lambda q, path: ck.save(q, path),
    "qparams JSON": lambda q, path: ptq4vit.write_qparams_json(q, path),
}


@pytest.mark.parametrize("what", sorted(WRITERS))
@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_follow_the_umask(q, tmp_path, umask, what, mask, mode):
    umask(mask)
    WRITERS[what](q, tmp_path / "out")
    assert _mode(tmp_path / "out") == mode


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_report_files_follow_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    written = _write_report(tmp_path / "rep")
    assert {p.name: _mode(p) for p in written.values()} == {p.name: mode for p in written.values()}


def test_replacing_a_file_keeps_its_mode(q, tmp_path, umask):
    path = tmp_path / "q.safetensors"
    ck.save(q, path)
    os.chmod(path, 0o640)
    ck.save(q, path)
    assert _mode(path) == 0o640


# ---- failures: one line naming the file and the cause, no temporary file, the previous file intact

@pytest.fixture
def previous(q, tmp_path):
    path = tmp_path / "q.safetensors"
    ck.save(q, path)
    return path, path.read_bytes()


def _only(path, data):
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert path.read_bytes() == data


def _raise(exc):
    def f(*args, **kwargs):
        raise exc
    return f


def test_save_to_a_folder(q, tmp_path):
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {tmp_path}: it is a folder; give a file name"):
        ck.save(q, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_save_into_a_missing_folder(q, tmp_path):
    target = tmp_path / "missing" / "q.safetensors"
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {target}: the folder {target.parent} does "
                                              f"not exist"):
        ck.save(q, target)
    assert list(tmp_path.iterdir()) == []


def test_save_into_a_read_only_folder(q, previous, monkeypatch):
    path, data = previous
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: _raise(PermissionError(errno.EACCES, "Permission denied"))()
                        if str(p).startswith(str(path.parent)) else real_open(p, *a, **k))
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {path}: Permission denied"):
        ck.save(q, path)
    monkeypatch.undo()
    _only(path, data)


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_save_on_a_full_disk(q, previous, monkeypatch, failing):
    path, data = previous
    monkeypatch.setattr(os, failing, _raise(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {path}: No space left on device"):
        ck.save(q, path)
    monkeypatch.undo()
    _only(path, data)


def test_save_interrupted_by_ctrl_c(q, previous, monkeypatch):
    path, data = previous
    monkeypatch.setattr(os, "fsync", _raise(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ck.save(q, path)
    monkeypatch.undo()
    _only(path, data)


def test_qparams_json_on_a_full_disk_and_interrupted(q, tmp_path, monkeypatch):
    path = tmp_path / "qparams.json"
    ptq4vit.write_qparams_json(q, path)
    data = path.read_bytes()
    monkeypatch.setattr(os, "fsync", _raise(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(UserError, match=f"cannot write qparams JSON {path}: No space left on device"):
        ptq4vit.write_qparams_json(q, path)
    monkeypatch.setattr(os, "fsync", _raise(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ptq4vit.write_qparams_json(q, path)
    monkeypatch.undo()
    _only(path, data)
    with pytest.raises(UserError, match=f"cannot write qparams JSON {tmp_path}: it is a folder"):
        ptq4vit.write_qparams_json(q, tmp_path)

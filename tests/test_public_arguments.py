"""Every public entry point checks its annotated arguments by one mechanism (``typecheck.checked``)
before it reads or writes anything; a wrong type gives one UserError line naming the argument."""
import inspect
import typing

import pytest

import ptq4vit
from ptq4vit import UserError
from ptq4vit.export import export_onnx
from ptq4vit.typecheck import checked
from _fastq import fast_quantize
from conftest import make_tiny

#: The library's public functions that take user input, each decorated with ``checked``.
ENTRY_POINTS = [ptq4vit.save, ptq4vit.load, ptq4vit.checkpoint.read_metadata, ptq4vit.write_qparams_json, export_onnx]


def test_checked_names_the_argument_and_stores_ints_of_float_arguments():
    @checked
    def f(a: int, b: float = 1.0, *rest, c: typing.Optional[str] = None, **extra) -> float:
        return b

    assert f(1, 2) == 2.0 and type(f(1, 2)) is float
    assert f(1, 2.5, "anything", c="x", whatever=object()) == 2.5  # *rest and **extra are not checked
    with pytest.raises(UserError, match=r"^a must be an int, got '1' \(str\)$"):
        f("1")
    with pytest.raises(UserError, match=r"^c must be a string or None, got 3 \(int\)$"):
        f(1, c=3)
    with pytest.raises(UserError, match=r"^f\(\): missing a required argument: 'a'$"):
        f()


@pytest.mark.parametrize("func", ENTRY_POINTS, ids=lambda f: f.__name__)
def test_entry_points_are_checked(func):
    assert inspect.unwrap(func) is not func, f"{func.__name__} is not decorated with typecheck.checked"


@pytest.fixture(scope="module")
def qmodel():
    return fast_quantize(*make_tiny("vit"))


def test_a_path_of_another_type_is_refused_by_name_before_writing(qmodel, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for call in (lambda: ptq4vit.save(qmodel, 123), lambda: ptq4vit.write_qparams_json(qmodel, 123),
                 lambda: export_onnx(qmodel, 123)):
        with pytest.raises(UserError, match=r"^path must be a string or a PathLike, got 123 \(int\)$"):
            call()
    with pytest.raises(UserError, match=r"^path must be a string or a PathLike, got None$"):
        ptq4vit.load(None)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_bad_options_by_name(qmodel, tmp_path):
    out = tmp_path / "m.onnx"
    with pytest.raises(UserError, match=r"^batch_size must be a positive int .* got 0$"):
        export_onnx(qmodel, out, batch_size=0)
    with pytest.raises(UserError, match=r"^int8 must be True or False, got 'false' \(str\)$"):
        export_onnx(qmodel, out, int8="false")
    with pytest.raises(UserError, match=r"^batch_size must be an int or None, got 8.0 \(float\)$"):
        export_onnx(qmodel, out, batch_size=8.0)
    assert not out.exists()


def test_loading_a_folder_says_it_is_a_folder(tmp_path):
    with pytest.raises(UserError, match=r"^checkpoint .* is not a file$"):
        ptq4vit.load(tmp_path)
    with pytest.raises(UserError, match=r"^checkpoint .* does not exist$"):
        ptq4vit.load(tmp_path / "missing.safetensors")


def test_checkpoint_entry_points_raise_checkpoint_errors(qmodel):
    from ptq4vit import CheckpointError
    with pytest.raises(CheckpointError, match=r"^qmodel must be a QuantizedModel, got 'x' \(str\)$"):
        ptq4vit.save("x", "q.safetensors")
    with pytest.raises(CheckpointError, match=r"^load\(\): missing a required argument: 'path'$"):
        ptq4vit.load()

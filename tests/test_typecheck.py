"""Every field and argument checked by its declared type, by one mechanism (ptq4vit.typecheck)."""
import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from ptq4vit import UserError, get_preset
from ptq4vit.presets import PRESETS, Preset, parse_field
from ptq4vit.typecheck import check_fields, check_value, parse_text

HINTS = typing.get_type_hints(Preset)


def wrong_values(hint) -> list:
    """Values of another type than ``hint`` declares, derived from the declaration alone."""
    if hint is bool:
        return ["false", 1, None]
    if hint is int:
        return [5.5, "5", True, None]
    if hint is float:
        return ["0.5", True, None, math.nan, math.inf]
    if hint is str:
        return [3, None, b"x"]
    if typing.get_origin(hint) is Literal:
        return ["not-a-choice", typing.get_args(hint)[0].upper() + "!", 0, None]
    raise AssertionError(f"no wrong values known for {hint!r}: extend the test")


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(Preset)])
def test_every_preset_field_refuses_a_wrong_type_by_name(name):
    base = PRESETS["ptq4vit"]
    for value in wrong_values(HINTS[name]):
        with pytest.raises(UserError) as e:
            dataclasses.replace(base, **{name: value})
        message = str(e.value)
        assert message.startswith(f"Preset field {name} must be "), message
        assert message.endswith(f"got {value!r}" if value is None else f"got {value!r} ({type(value).__name__})")
        assert "\n" not in message


@pytest.mark.parametrize("override, message", [
    (dict(n_candidates=5.5), "Preset field n_candidates must be an int, got 5.5 (float)"),
    (dict(n_candidates="5"), "Preset field n_candidates must be an int, got '5' (str)"),
    (dict(rounds="3"), "Preset field rounds must be an int, got '3' (str)"),
    (dict(softmax_renorm="false"), "Preset field softmax_renorm must be True or False, got 'false' (str)"),
    (dict(softmax_log_scale="false"), "Preset field softmax_log_scale must be True or False, got 'false' (str)"),
    (dict(gelu_twin=0), "Preset field gelu_twin must be True or False, got 0 (int)"),
    (dict(weight_rounding="GPTQ"), "Preset field weight_rounding must be one of 'nearest', 'gptq', got 'GPTQ' (str)"),
    (dict(w_granularity="row"), "Preset field w_granularity must be one of 'block', 'channel', got 'row' (str)"),
    (dict(rotation_kind="givens"),
     "Preset field rotation_kind must be one of 'hadamard', 'orthogonal', got 'givens' (str)"),
    (dict(softmax_log="log3"), "Preset field softmax_log must be one of 'none', 'log2', 'log_sqrt2', got 'log3' (str)"),
    (dict(gelu_log=None), "Preset field gelu_log must be one of 'none', 'log2', 'log_sqrt2', got None"),
    (dict(calibration="minmax"), "Preset field calibration must be one of 'search', 'percentile', got 'minmax' (str)"),
    (dict(alpha=float("nan")), "Preset field alpha must be a finite number, got nan (float)"),
])
def test_listed_wrong_types_give_one_line(override, message):
    with pytest.raises(UserError) as e:
        get_preset("ptq4vit", **override)
    assert str(e.value) == message


def test_an_int_for_a_float_field_is_stored_as_that_float():
    p = get_preset("ptq4vit", alpha=1, beta=2)
    assert type(p.alpha) is float and p.alpha == 1.0 and type(p.beta) is float
    assert p == get_preset("ptq4vit", alpha=1.0, beta=2.0)
    assert p.overrides() == {"alpha": 1.0, "beta": 2.0} and type(p.overrides()["alpha"]) is float


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_command_line_text_reads_back_every_field_of_every_preset(preset):
    """The command line reads a field by the same declared type the API checks it against."""
    p = PRESETS[preset]
    for f in dataclasses.fields(Preset):
        if f.name in ("name", "description"):
            continue
        value = getattr(p, f.name)
        parsed = parse_field(f.name, _text(value))
        assert parsed == value and type(parsed) is type(value), (f.name, parsed, value)


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(Preset) if f.name not in ("name", "description")])
def test_command_line_refuses_text_of_another_type_by_field(name):
    with pytest.raises(UserError) as e:
        parse_field(name, "5.5x")
    assert str(e.value).startswith(f"preset field {name} must be "), str(e.value)
    assert str(e.value).endswith("got '5.5x'")


@dataclass(frozen=True)
class _Component:
    """A dataclass other than Preset: the mechanism is not Preset's."""

    kind: Literal["a", "b"] = "a"
    size: Optional[int] = None
    weights: tuple[float, ...] = ()
    pair: tuple[int, str] = (1, "x")
    strength: float = 0.5

    def __post_init__(self):
        check_fields(self, "component")


def test_any_frozen_dataclass_is_checked_field_by_field():
    c = _Component(kind="b", size=3, weights=(1, 2.5), pair=(2, "y"), strength=1)
    assert c.weights == (1.0, 2.5) and type(c.weights[0]) is float and type(c.strength) is float
    assert _Component(size=None).size is None
    for kwargs, message in [
        (dict(kind="c"), "component field kind must be one of 'a', 'b', got 'c' (str)"),
        (dict(size=2.0), "component field size must be an int or None, got 2.0 (float)"),
        (dict(weights=[1.0]), "component field weights must be a tuple whose items are each a finite number, "
                              "got [1.0] (list)"),
        (dict(weights=(1.0, "2")), "component field weights must be a tuple whose items are each a finite number, "
                                   "got (1.0, '2') (tuple)"),
        (dict(pair=(1, 2)), "component field pair must be a tuple of 2 items: an int, a string, got (1, 2) (tuple)"),
    ]:
        with pytest.raises(UserError) as e:
            _Component(**kwargs)
        assert str(e.value) == message


def test_text_of_optional_and_tuple_types():
    assert parse_text("size", "none", Optional[int]) is None
    assert parse_text("size", "12", Optional[int]) == 12
    assert parse_text("weights", "1, 2.5", tuple[float, ...]) == (1.0, 2.5)
    with pytest.raises(UserError, match="^size must be an int or none, got 'many'$"):
        parse_text("size", "many", Optional[int])
    with pytest.raises(UserError, match="^x must be a finite number, got 'inf'$"):
        parse_text("x", "inf", float)


def test_long_values_are_named_by_type_only():
    with pytest.raises(UserError) as e:
        check_value("images", list(range(100)), int)
    assert str(e.value) == "images must be an int, got a list"

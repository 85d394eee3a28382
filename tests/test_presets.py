"""Preset fields read from the command line: typed by the field, one value per configuration."""
import pytest

from ptq4vit import UserError, get_preset
from ptq4vit.harness.cli.common import parse_overrides
from ptq4vit.harness.store import run_key
from ptq4vit.presets import parse_field


@pytest.mark.parametrize("text", ["0", "false", "False", "no", "off"])
def test_bool_spellings_are_one_value(text):
    assert parse_field("gelu_twin", text) is False


@pytest.mark.parametrize("text", ["1", "true", "YES", "on"])
def test_true_spellings(text):
    assert parse_field("gelu_twin", text) is True


def test_numbers_take_the_field_type():
    assert parse_field("alpha", "1") == 1.0 and isinstance(parse_field("alpha", "1"), float)
    assert parse_field("n_candidates", "20") == 20 and isinstance(parse_field("n_candidates", "20"), int)


def test_equal_configurations_give_one_run_key():
    a = parse_overrides(["gelu_twin=0", "alpha=1"])
    b = parse_overrides(["gelu-twin=false", "alpha=1.0"])
    assert a == b
    assert run_key({"preset": "ptq4vit", "overrides": a}) == run_key({"preset": "ptq4vit", "overrides": b})
    assert get_preset("ptq4vit", **a).gelu_twin is False


@pytest.mark.parametrize("item, message", [
    ("gelu_twin=maybe", "gelu_twin must be true or false, got 'maybe'"),
    ("n_candidates=1.5", "preset field n_candidates must be an int, got '1.5'"),
    ("metric=l1", "metric must be one of cosine, mse, hessian, got 'l1'"),
    ("colour=red", "unknown preset field 'colour'"),
    ("metric", "--set expects FIELD=VALUE, got 'metric'"),
])
def test_bad_values_are_named(item, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_overrides([item])

"""The ``timm.create_model`` arguments that rebuild a supported architecture, and the values each takes.

A checkpoint stores the keyword arguments that rebuild its float architecture, and ``load``
passes them to timm. timm's ``create_model`` also takes arguments that read files or fetch
weights (``checkpoint_path``, ``pretrained_cfg``, ``pretrained_cfg_overlay``, ...), so only the
arguments each adapter declares here pass, each as the plain JSON value it describes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional


@dataclass(frozen=True)
class ArgKind:
    """What values one argument takes: ``accepts(value)``, described as ``expected`` in messages."""

    expected: str
    accepts: Callable[[Any], bool]


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(v: Any) -> bool:
    return _int(v) and v > 0


def _positive_ints(n: Optional[int]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and (n is None or len(v) == n) and len(v) > 0 and all(map(_positive_int, v))


def _number(v: Any) -> bool:
    return (_int(v) or isinstance(v, float)) and math.isfinite(v)


POSITIVE_INT = ArgKind("a positive integer", _positive_int)
COUNT = ArgKind("an integer >= 0", lambda v: _int(v) and v >= 0)
SIZE = ArgKind("a positive integer or a list of two", lambda v: _positive_int(v) or _positive_ints(2)(v))
POSITIVE_INTS = ArgKind("a list of positive integers", _positive_ints(None))
POSITIVE_NUMBER = ArgKind("a positive number", lambda v: _number(v) and v > 0)
BOOL = ArgKind("true or false", lambda v: isinstance(v, bool))
BOOL_OR_NONE = ArgKind("true, false or null", lambda v: v is None or isinstance(v, bool))
NUMBER_OR_NONE = ArgKind("a number or null", lambda v: v is None or _number(v))
PROBABILITY = ArgKind("a number from 0 to 1", lambda v: _number(v) and 0 <= v <= 1)


def one_of(*choices: str) -> ArgKind:
    return ArgKind(f"one of {', '.join(repr(c) for c in choices)}", lambda v: isinstance(v, str) and v in choices)


#: Arguments every supported family takes: what users change most (``derive_create_kwargs`` tries them first).
COMMON_CREATE_ARGS: dict[str, ArgKind] = {"num_classes": COUNT, "img_size": SIZE, "in_chans": POSITIVE_INT}


def create_args_problem(kwargs: Mapping[str, Any], allowed: Mapping[str, ArgKind]) -> Optional[str]:
    """Why ``kwargs`` cannot pass to ``timm.create_model`` (the first key not in ``allowed``, or the
    first value of the wrong kind), in words; None when every argument is allowed and well typed."""
    for key, value in kwargs.items():
        kind = allowed.get(key)
        if kind is None:
            return (f"argument {key!r} is not an architecture argument ptq4vit rebuilds models with "
                    f"(allowed: {', '.join(sorted(allowed))})")
        if not kind.accepts(value):
            return f"argument {key!r} must be {kind.expected}, got {value!r}"
    return None

"""Values checked against their declared types: one mechanism for every public boundary.

A dataclass's fields and a function's arguments declare their types as annotations; these
functions read them (``typing.get_type_hints``, so string annotations under
``from __future__ import annotations`` work) and refuse a value of another type with one
:class:`~ptq4vit.errors.UserError` line naming it, what it expects and what it got. Nothing
here knows a particular dataclass or function: a new field or argument is checked by being
annotated. What a declared type accepts:

* ``bool``: ``True`` or ``False`` only (``0``, ``1`` and ``"false"`` are not booleans; the string
  ``"false"`` is truthy, so taking it would read it as true).
* ``int``: an ``int`` that is not a ``bool`` (Python counts ``True`` as the int 1).
* ``float``: a finite ``int`` or ``float`` (not a ``bool``); an ``int`` is stored as the equal float,
  so ``alpha=1`` and ``alpha=1.0`` are one value.
* ``str``: a ``str``; ``Literal["a", "b"]``: exactly one of its choices.
* ``Optional[X]`` / ``Union[X, Y]``: what any member accepts; ``tuple[X, ...]`` / ``tuple[X, Y]``:
  a tuple of such items; ``Any``: anything; a class: an instance of it.

Ranges and rules between fields (``0 < alpha < beta``) are the owner's to check after this.
:func:`parse_text` reads a command-line string as a value of a declared type, so the command
line and the API accept the same values.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import types
import typing
from typing import Any, Callable, Literal, Optional, Union

from .errors import UserError

_NONE_TYPE = type(None)
#: ``X | Y`` unions (Python >= 3.10) and ``typing.Union``.
_UNIONS = (Union, getattr(types, "UnionType", Union))
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _members(hint) -> tuple:
    """The members of a Union (``Optional[X]``, ``X | Y``), else ``()``."""
    if typing.get_origin(hint) in _UNIONS:
        return typing.get_args(hint)
    return ()


def describe(hint) -> str:
    """What ``hint`` accepts, in words: ``an int or None``, ``one of 'select', 'sum'``."""
    if hint is bool:
        return "True or False"
    if hint is int:
        return "an int"
    if hint is float:
        return "a finite number"
    if hint is str:
        return "a string"
    if hint is _NONE_TYPE or hint is None:
        return "None"
    if hint is Any:
        return "anything"
    members = _members(hint)
    if members:
        return " or ".join(describe(m) for m in members)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a tuple whose items are each {describe(args[0])}"
        return f"a tuple of {len(args)} items: " + ", ".join(describe(a) for a in args)
    if isinstance(hint, type):
        return f"a {hint.__qualname__}"
    if isinstance(origin, type):  # os.PathLike[str], dict[str, int]: the class; items are not checked
        return describe(origin)
    raise TypeError(f"ptq4vit.typecheck cannot check values against {hint!r}")


def coerce(value, hint) -> tuple[bool, Any]:
    """``(True, stored value)`` if ``value`` is of type ``hint`` (an int for a float becomes that
    float), else ``(False, value)``."""
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else value
    if hint is _NONE_TYPE or hint is None:
        return value is None, value
    if hint is Any:
        return True, value
    members = _members(hint)
    if members:
        for m in members:
            ok, stored = coerce(value, m)
            if ok:
                return True, stored
        return False, value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        # type() too: 1 == True, and a choice "1" must not take the int 1
        return any(value == a and type(value) is type(a) for a in args), value
    if origin is tuple:
        if not isinstance(value, tuple):
            return False, value
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            return False, value
        stored = [coerce(v, h) for v, h in zip(value, items)]
        return all(ok for ok, _ in stored), tuple(v for _, v in stored)
    if isinstance(hint, type):
        return isinstance(value, hint), value
    if isinstance(origin, type):
        return isinstance(value, origin), value
    raise TypeError(f"ptq4vit.typecheck cannot check values against {hint!r}")


def shown(value) -> str:
    """``value`` for an error message: its repr and type when short, else its type alone."""
    text = repr(value)
    if len(text) > 60 or "\n" in text:
        return f"a {type(value).__qualname__}"
    return text if value is None else f"{text} ({type(value).__qualname__})"


def check_value(name: str, value, hint):
    """``value`` as stored (see :func:`coerce`); UserError naming ``name`` if it is not of type ``hint``."""
    ok, stored = coerce(value, hint)
    if not ok:
        raise UserError(f"{name} must be {describe(hint)}, got {shown(value)}")
    return stored


def check_fields(obj, what: str = "") -> None:
    """Check every field of the dataclass instance ``obj`` against its annotation (frozen ones too);
    ints in float fields are stored as floats. Messages name ``{what} field {name}`` (``what``
    defaults to the class name)."""
    hints = typing.get_type_hints(type(obj))
    what = what or type(obj).__name__
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        stored = check_value(f"{what} field {f.name}", value, hints[f.name])
        if stored is not value:
            object.__setattr__(obj, f.name, stored)  # frozen dataclasses refuse plain assignment


def check_arguments(func: Callable, values: dict[str, Any]) -> dict[str, Any]:
    """Check ``values`` (argument name -> value) against ``func``'s annotations; the values as stored.

    Messages name the argument alone, as the caller wrote it.
    """
    hints = typing.get_type_hints(func)
    return {name: check_value(name, value, hints[name]) for name, value in values.items()}


def checked(func: Optional[Callable] = None, *, error: type[UserError] = UserError):
    """Decorate a public function so that every annotated argument it is called with is checked
    (:func:`check_value`, naming the argument) before its body runs; ``*args``/``**kwargs`` are not.
    ``@checked(error=CheckpointError)`` raises that subclass of UserError instead."""
    if func is None:
        return functools.partial(checked, error=error)
    signature = inspect.signature(func)
    hints: dict = {}

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if not hints:  # resolved at the first call: annotations may name what the module defines later
            hints.update(typing.get_type_hints(func))
        try:
            bound = signature.bind(*args, **kwargs)
            for name, value in bound.arguments.items():
                kind = signature.parameters[name].kind
                if name in hints and kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                    bound.arguments[name] = check_value(name, value, hints[name])
        except TypeError as e:  # arguments that do not fit the signature at all
            raise error(f"{func.__name__}(): {e}") from None
        except UserError as e:
            raise (e if type(e) is error else error(str(e))) from None
        return func(*bound.args, **bound.kwargs)

    return wrapper


def parse_text(name: str, text: str, hint):
    """``text``, as written on a command line, read as a value of type ``hint``.

    Booleans take true/false, yes/no, on/off and 1/0 (any case); ``None`` takes ``none``; a
    tuple takes comma-separated items. The value is then checked as :func:`check_value` does.
    """
    value = text.strip()
    members = _members(hint)
    if members:
        for m in members:
            try:
                return parse_text(name, value, m)
            except UserError:
                continue
        raise UserError(f"{name} must be {_describe_text(hint)}, got {value!r}")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        items = [t for t in value.split(",") if t.strip()]
        hints = args[:1] * len(items) if len(args) == 2 and args[1] is Ellipsis else args
        if len(hints) != len(items):
            raise UserError(f"{name} must be {_describe_text(hint)} (comma-separated), got {value!r}")
        return tuple(parse_text(name, t, h) for t, h in zip(items, hints))
    try:
        parsed = _parse_one(value, hint)
    except ValueError:
        raise UserError(f"{name} must be {_describe_text(hint)}, got {value!r}") from None
    return check_value(name, parsed, hint)


def _parse_one(value: str, hint):
    """One text item as ``hint``; ValueError if it does not read as one."""
    if hint is bool:
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise ValueError(value)
    if hint is int:
        return int(value)
    if hint is float:
        parsed = float(value)
        if not math.isfinite(parsed):
            raise ValueError(value)
        return parsed
    if hint is _NONE_TYPE or hint is None:
        if value.lower() != "none":
            raise ValueError(value)
        return None
    if typing.get_origin(hint) is Literal:
        for choice in typing.get_args(hint):
            if str(choice) == value:
                return choice
        raise ValueError(value)
    if hint is str or hint is Any:
        return value
    raise ValueError(value)  # a class: no text spelling


def _describe_text(hint) -> str:
    """:func:`describe` in command-line spelling (true/false, bare choices)."""
    if hint is bool:
        return "true or false"
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(hint))
    members = _members(hint)
    if members:
        return " or ".join(_describe_text(m) for m in members)
    return "none" if hint is _NONE_TYPE else describe(hint)


__all__ = ["check_arguments", "check_fields", "checked", "check_value", "coerce", "describe", "parse_text", "shown"]

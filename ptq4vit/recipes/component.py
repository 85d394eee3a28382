"""What every recipe component shares: typed frozen fields, a variant name, a dict form.

A component is a small frozen dataclass. Where a recipe slot is a choice (softmax operand:
uniform | twin | log | float), each choice is its own class, named by ``variant``, and owns
the parameters that only it has, so a parameter of another choice cannot be written.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

from ..errors import UserError
from ..typecheck import check_fields


class Component:
    """Base of the recipe components (subclasses are frozen dataclasses)."""

    #: The variant's name: its spelling on the command line and in the stored recipe.
    variant: ClassVar[str] = ""

    def __post_init__(self):
        check_fields(self, what=f"{self.variant}")  # types and choices; the ranges and rules follow
        self.check()

    def check(self) -> None:
        """Ranges and rules among this component's own fields (UserError naming them)."""

    def flat_fields(self) -> dict:
        """The fields of the flat :class:`~ptq4vit.recipes.flat.Preset` this component sets (the
        stored legacy view, :func:`~ptq4vit.recipes.flat.to_flat`); the rest keep their defaults."""
        return {}

    def to_dict(self) -> dict:
        """The component as JSON data: ``{"variant": ..., field: value, ...}``."""
        return {"variant": self.variant, **{f.name: encode(getattr(self, f.name)) for f in dataclasses.fields(self)}}


def encode(value: Any) -> Any:
    """A field value as JSON data (components as dicts, tuples as lists)."""
    if isinstance(value, Component):
        return value.to_dict()
    if isinstance(value, tuple):
        return [encode(v) for v in value]
    return value


def variants(hint) -> dict[str, type]:
    """The component classes a field of type ``hint`` accepts, by variant name ({} for a plain field)."""
    members = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
    return {m.variant: m for m in members if isinstance(m, type) and issubclass(m, Component)}


def item_hint(hint):
    """The item type of a ``tuple[X, ...]`` hint, else None."""
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
    return None


def build(where: str, value: Any, hint) -> Any:
    """``value`` for a field of type ``hint``: a variant name (``"twin"``) or a stored dict becomes
    that component with its defaults (or the dict's fields); a tuple of components takes names,
    dicts or a comma-separated string. Anything else is returned for the type check."""
    inner = item_hint(hint)
    if inner is not None and variants(inner):
        if isinstance(value, str):
            value = tuple(v.strip() for v in value.split(",") if v.strip() and v.strip() != "none")
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(value, tuple):
            return tuple(build(where, v, inner) for v in value)
        return value
    choices = variants(hint)
    if not choices:
        return value
    if isinstance(value, str):
        value = {"variant": value}
    if isinstance(value, dict):
        data = dict(value)
        name = data.pop("variant", None)
        if name not in choices:
            raise UserError(f"{where} must be one of {', '.join(choices)}, got {name!r}")
        cls = choices[name]
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{where} ({name}) has no field(s) {', '.join(unknown)}; its fields: "
                            f"{', '.join(sorted(known)) or 'none'}")
        return cls(**{k: build(f"{where}.{k}", v, hints[k]) for k, v in data.items()})
    return value

"""Presets: the named recipes, seen through the flat view the calibration engine reads.

The recipes (:mod:`ptq4vit.recipes`) are the source of truth; a :class:`Preset` is a recipe's
resolved flat view (``recipe.flat()``). ``get_preset`` and ``parse_field`` keep the flat field
names working: ``get_preset("official", metric="cosine", softmax_twin=False)`` is
``get_recipe("official", metric="cosine", softmax_twin=False).flat()``.
"""
from __future__ import annotations

import typing
from typing import Any, Union

from .errors import UserError
from .recipes import RECIPES, Recipe, get_recipe, path_hint
from .recipes.named import is_flat_name
from .recipes.calibration import GradSource
from .recipes.component import item_hint, variants
from .recipes.flat import FLAT_PATHS, LogQuantization, Metric, Preset
from .recipes.transforms import ROTATION_KINDS, RotationKind
from .typecheck import parse_text

#: Each named recipe's flat view, by name.
PRESETS: dict[str, Preset] = {name: r.flat() for name, r in RECIPES.items()}


def get_preset(preset: Union[str, Preset, Recipe], **overrides: Any) -> Preset:
    """The flat view of a named recipe (or a Recipe, or a Preset) with overrides (flat names or dotted
    paths, see :func:`ptq4vit.get_recipe`); unknown names and fields raise UserError."""
    return get_recipe(preset, **overrides).flat()


def parse_field(name: str, text: str):
    """``text`` (as written on a command line) as a value of the flat field or recipe path ``name``.

    The declared type decides, so ``gelu_twin=0`` and ``gelu_twin=false`` give the same recipe
    (and the same run key); a path naming a component (``softmax=log``) takes a variant name, and
    ``transforms`` comma-separated variant names.
    """
    hints = typing.get_type_hints(Preset)
    if is_flat_name(name, text.strip()):
        if name not in hints or name in ("name", "description"):
            fields = sorted(set(hints) - {"name", "description"})
            raise UserError(f"unknown preset field {name!r}; valid fields: {', '.join(fields)}, "
                            f"or a recipe path such as calibration.alpha")
        return parse_text(f"preset field {name}", text, hints[name])
    hint = path_hint(name)
    if variants(hint) or item_hint(hint):
        return text.strip()  # a variant name (or comma-separated names), built by Recipe.replace
    return parse_text(f"recipe path {name}", text, hint)


__all__ = ["Preset", "PRESETS", "get_preset", "parse_field", "FLAT_PATHS", "ROTATION_KINDS", "RotationKind",
           "GradSource", "Metric", "LogQuantization"]

"""A recipe: the quantization method as a few typed components (docs/recipes in README).

The recipe is the source of truth for what a run does: the public API, validation, run keys,
checkpoints and the calibration engine use it. Its flat view, :meth:`Recipe.flat` (a
:class:`~ptq4vit.recipes.flat.Preset`), is derived from it for checkpoints and never written by hand.
Rules within one component live in that component; rules that span two live here.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import UserError
from ..typecheck import check_fields, check_value
from .calibration import Calibration, GridSearch, Percentile
from .component import Component, build, encode, item_hint, variants
from .flat import to_flat
from .reconstruction import NoReconstruction, ReconstructionChoice
from .operands import Gelu, LogSoftmax, TwinGelu, TwinSoftmax, Softmax
from .transforms import TRANSFORM_ORDER, BiasCorrection, LayerNormReparam, Rotation, Smoothing, Transform
from .weights import Weights

#: The recipe's own fields that are not part of what it computes.
LABELS = ("name", "description")


@dataclass(frozen=True)
class Recipe:
    """How a model is quantized; build one with :func:`~ptq4vit.get_recipe` or from its components."""
    name: str = "custom"
    description: str = field(default="", compare=False)
    calibration: Calibration = field(default_factory=GridSearch)
    weights: Weights = field(default_factory=Weights)
    softmax: Softmax = field(default_factory=TwinSoftmax)
    gelu: Gelu = field(default_factory=TwinGelu)
    #: The inputs of qkv, fc1, fc2 (uniform post-GELU input) and the head: symmetric, or asymmetric
    #: (a step and an integer zero point, the range ``[min(x, 0), max(x, 0)]`` searched on the grid);
    #: proj's input and the attention operands stay symmetric (docs/deployment.md).
    inputs: Literal["symmetric", "asymmetric"] = "symmetric"
    #: Bits of the classifier head's weight and input; 0: the run's (docs/lowbit.md §7).
    head_bits: int = 0
    #: Bits of the patch embedding's image input (asymmetric, per tensor); 0: float.
    patch_input_bits: int = 0
    #: Function-preserving transforms, kept in the order they apply (``TRANSFORM_ORDER``).
    transforms: tuple[Transform, ...] = ()
    #: Learned rounding and activation steps after calibration (docs/lowbit.md §11); ``none`` by default.
    reconstruction: ReconstructionChoice = field(default_factory=NoReconstruction)

    def __post_init__(self):
        for f in dataclasses.fields(self):  # variant names and stored dicts become components
            hint = typing.get_type_hints(Recipe)[f.name]
            object.__setattr__(self, f.name, build(f.name, getattr(self, f.name), hint))
        check_fields(self, what="recipe")
        kinds = [t.variant for t in self.transforms]
        if len(set(kinds)) != len(kinds):
            raise UserError(f"recipe transforms name a transform twice: {', '.join(kinds)}")
        object.__setattr__(self, "transforms", tuple(sorted(self.transforms,
                                                            key=lambda t: TRANSFORM_ORDER.index(t.variant))))
        for name in ("head_bits", "patch_input_bits"):
            bits = getattr(self, name)
            if bits != 0 and not 2 <= bits <= 8:
                raise UserError(f"recipe {name} must be 0 (see its doc) or 2..8, got {bits}")
        self._check_calibration()
        self._check_transforms()

    def transform(self, variant: str) -> "Transform | None":
        """The recipe's transform of that variant name, or None."""
        return next((t for t in self.transforms if t.variant == variant), None)

    def _check_calibration(self) -> None:
        """Percentile calibration owns its quantizers: what it has no initialisation for is refused."""
        if self.calibration.variant == "grid_search":
            if self.patch_input_bits:
                raise UserError("patch_input_bits needs calibration=percentile (RepQ-ViT's asymmetric image quantizer)")
            if self.transform("ln_reparam"):
                raise UserError("the ln_reparam transform needs calibration=percentile (RepQ-ViT's per-channel ranges)")
            return
        clash = [what for what, on in (
            (f"weights {self.weights.to_dict()} (percentile weights are per channel, rounded to nearest)",
             self.weights != Weights()),
            ("softmax=twin", self.softmax.variant == "twin"),
            (f"gelu={self.gelu.variant}", self.gelu.variant != "uniform"),
            ("inputs=asymmetric (percentile is asymmetric everywhere)", self.inputs == "asymmetric"),
            ("the smoothing transform", self.transform("smoothing") is not None),
            ("the bias_correction transform", self.transform("bias_correction") is not None)) if on]
        if clash:
            raise UserError(f"calibration=percentile has no initialisation for {'; '.join(clash)}")

    def _check_transforms(self) -> None:
        rotation = self.transform("rotation")
        if rotation is None:
            return
        if rotation.fc2 and self.gelu.variant != "uniform":
            raise UserError(f"rotation.fc2 makes fc2's input no longer post-GELU: it needs gelu=uniform, "
                            f"not gelu={self.gelu.variant}")
        if rotation.residual and self.transform("ln_reparam"):
            raise UserError("ln_reparam folds into LayerNorm's affine, which rotation.residual folds away: "
                            "use one of them")

    # ------------------------------------------------------------------ data, views, overrides

    def to_dict(self) -> dict:
        """The recipe as JSON data (what checkpoints store and run keys hash, with ``name``). Without
        reconstruction the slot is left out: the data, and so every run key, is what it was before
        the slot existed, and files of recipes without it still load in versions that lack it."""
        data = {f.name: encode(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if self.reconstruction.variant == "none":
            del data["reconstruction"]
        return data

    def key_dict(self) -> dict:
        """What defines the recipe's results: every component and its name, not its description."""
        return {k: v for k, v in self.to_dict().items() if k != "description"}

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        """A recipe from :meth:`to_dict`'s data; unknown fields and bad values raise UserError."""
        if not isinstance(data, dict):
            raise UserError(f"a recipe must be an object, got {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"the recipe has fields this ptq4vit does not know ({', '.join(unknown)})")
        return cls(**data)

    def flat(self):
        """The resolved flat view checkpoints store beside the recipe (derived; see module docstring)."""
        return to_flat(self)

    def replace(self, path: str, value: Any) -> "Recipe":
        """The recipe with the field at the dotted ``path`` set to ``value``, e.g.
        ``replace("calibration.alpha", 0.3)``, ``replace("transforms.rotation.seed", 1)`` or
        ``replace("softmax", "log")`` (a variant by name: the parameters it shares with the current
        variant, such as ``renorm``, carry over, the others take their defaults; the same variant is kept
        as it is). A path the recipe does not have (a parameter of another variant) is refused by name."""
        if not isinstance(path, str) or not path:
            raise UserError(f"a recipe path must be a dotted name such as calibration.alpha, got {path!r}")
        return _set(self, path.split("."), value, path)

    def summary(self) -> str:
        """The components in short: ``grid_search(hessian) · weights block/nearest · softmax twin ...``."""
        return summarize(self)


def _fields_of(obj) -> dict[str, Any]:
    return {f.name: typing.get_type_hints(type(obj))[f.name] for f in dataclasses.fields(obj) if f.name not in LABELS}


def _set(obj, segments: list[str], value: Any, path: str):
    head, rest = segments[0], segments[1:]
    if isinstance(obj, tuple):  # the transforms: the segment names one of them
        names = [t.variant for t in obj]
        if head not in names:
            raise UserError(f"{path}: the recipe has no {head} transform (it has: {', '.join(names) or 'none'}); "
                            f"add it with transforms={','.join(names + [head])}")
        if not rest:
            raise UserError(f"{path}: name a field of the {head} transform, or set transforms=... to add or remove it")
        i = names.index(head)
        return obj[:i] + (_set(obj[i], rest, value, path),) + obj[i + 1:]
    own = _fields_of(obj)
    if head not in own:
        what = f"{obj.variant}" if isinstance(obj, Component) else "the recipe"
        raise UserError(f"{path}: {what} has no {head!r} (its fields: {', '.join(own) or 'none'}), so it would "
                        f"change nothing")
    current = getattr(obj, head)
    if rest:
        new = _set(current, rest, value, path)
    else:
        hint = own[head]
        choices = variants(hint)
        if isinstance(value, str) and choices and value == getattr(current, "variant", None):
            new = current  # the variant it already is, with its parameters
        elif isinstance(value, str) and value in choices and isinstance(current, Component):
            # another variant: the parameters it shares with the current one (softmax renorm) carry over
            shared = {f.name for f in dataclasses.fields(choices[value])} & {f.name for f in dataclasses.fields(current)}
            new = choices[value](**{k: getattr(current, k) for k in shared})
        else:
            new = build(path, value, hint)
            if not (variants(hint) or item_hint(hint)):
                new = check_value(path, new, hint)
    return dataclasses.replace(obj, **{head: new})


def path_hint(path: str):
    """The declared type at a dotted path, found over every variant (for reading command-line text);
    UserError naming the path if no component has it."""
    hint: Any = Recipe
    for i, seg in enumerate(path.split(".")):
        inner = item_hint(hint)
        if inner is not None and variants(inner):
            choices = variants(inner)
            if seg not in choices:
                raise UserError(f"unknown recipe path {path!r}: {seg!r} is none of the transforms "
                                f"{', '.join(choices)}")
            hint = choices[seg]
            continue
        classes = list(variants(hint).values()) or ([hint] if hint is Recipe else [])
        found = [typing.get_type_hints(c)[seg] for c in classes
                 if seg in {f.name for f in dataclasses.fields(c)} and seg not in LABELS]
        if not found:
            where = ".".join(path.split(".")[:i]) or "the recipe"
            fields = sorted({f.name for c in classes for f in dataclasses.fields(c)} - set(LABELS))
            raise UserError(f"unknown recipe path {path!r}: {where} has no {seg!r} in any variant "
                            f"(fields: {', '.join(fields) or 'none'})")
        hint = found[0]
    return hint


def summarize(r: Recipe) -> str:
    """One line naming each component's variant and its non-default parameters."""
    def short(c) -> str:
        diff = [f"{f.name}={encode(getattr(c, f.name)) if not isinstance(getattr(c, f.name), Component) else short(getattr(c, f.name))}"
                for f in dataclasses.fields(c)
                if getattr(c, f.name) != getattr(type(c)(), f.name)]
        return c.variant + (f"({', '.join(diff)})" if diff else "")
    parts = [f"calibration={short(r.calibration)}", f"weights={short(r.weights)}", f"softmax={short(r.softmax)}",
             f"gelu={short(r.gelu)}"]
    parts += [f"inputs={r.inputs}"] if r.inputs != "symmetric" else []
    parts += [f"head_bits={r.head_bits}"] if r.head_bits else []
    parts += [f"patch_input_bits={r.patch_input_bits}"] if r.patch_input_bits else []
    parts += [f"transforms=[{', '.join(short(t) for t in r.transforms)}]"] if r.transforms else []
    parts += [f"reconstruction={short(r.reconstruction)}"] if r.reconstruction.variant != "none" else []
    return " ".join(parts)


__all__ = ["Recipe", "path_hint", "summarize", "BiasCorrection", "LayerNormReparam", "Rotation", "Smoothing",
           "Percentile", "LogSoftmax"]

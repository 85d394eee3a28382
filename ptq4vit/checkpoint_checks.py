"""What a checkpoint may hold, checked field by field: the content digest only proves that a file
is unchanged since it was written, not that whoever wrote it wrote sense.

* :func:`check_metadata`: every metadata field ``load`` reads has its JSON type and range; the
  model name is one a ptq4vit adapter supports (found without building anything), and the
  ``timm.create_model`` arguments are the architecture arguments that adapter declares
  (:mod:`ptq4vit.models.create_args`), so nothing can make timm read another file; the preset's
  fields are the known ones with values of their declared types; the data config holds only
  what timm's eval transform takes.
* :func:`check_tensors_match_structure`: every stored tensor has the dtype and shape the
  metadata records.
* :func:`codes_problem`: weight codes lie in the range of the bits the metadata records.

Each returns or raises one line naming the field or tensor.
"""
from __future__ import annotations

import math
import re
import typing
from typing import Any, Optional

import torch

from .errors import CheckpointError, UserError
from .models import DEFAULT_ADAPTERS, AdapterRegistry
from .models.create_args import COMMON_CREATE_ARGS, create_args_problem
from .recipes import Recipe
from .recipes.flat import Preset
from .quant import check_bits
from .quant.uniform import qmax
from .typecheck import check_value

#: The tensor dtypes a checkpoint may record, by the names it records them with.
DTYPES = {name: getattr(torch, name) for name in
          ("float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")}

#: What timm's eval transform (``create_transform``) may be given from a checkpoint's data config.
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos")
_CROP_MODES = ("center", "squash", "border")


def _fail(path: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _ints(v: Any, n: Optional[int] = None, low: int = 0) -> bool:
    return isinstance(v, list) and (n is None or len(v) == n) and all(_is_int(x) and x >= low for x in v)


# --------------------------------------------------------------------------------------------
# metadata


def _check_model(path: str, model: Any, adapters: AdapterRegistry) -> None:
    if not isinstance(model, dict):
        raise _fail(path, f"metadata 'model' must be an object, got {model!r}")
    name = model.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_\-]+)?", name):
        raise _fail(path, f"metadata model name {name!r} is not a timm model name (architecture or architecture.tag)")
    arch, _, tag = name.partition(".")
    for key, want in (("architecture", arch), ("tag", tag or None)):
        if model.get(key) not in (None, want):
            raise _fail(path, f"metadata model {key} {model.get(key)!r} disagrees with the model name {name!r}")
    if "dtype" in model and model["dtype"] not in DTYPES:
        raise _fail(path, f"metadata model dtype {model['dtype']!r} is not one of {', '.join(DTYPES)}")
    try:
        adapter = adapters.adapter_for_name(name)
    except UserError as e:
        raise _fail(path, str(e)) from None
    kwargs = model.get("create_kwargs")
    if not isinstance(kwargs, dict):
        raise _fail(path, f"metadata create_kwargs must be an object, got {kwargs!r}")
    problem = create_args_problem(kwargs, {**COMMON_CREATE_ARGS, **adapter.create_args})
    if problem is not None:
        raise _fail(path, f"create_kwargs for timm.create_model({name!r}): {problem}")


def preset_field_problem(stored: Any) -> Optional[str]:
    """Why a checkpoint's stored preset (a JSON object) is not a :class:`Preset` of this ptq4vit, or None.

    Each field is checked against its declared type by :mod:`ptq4vit.typecheck` (as the API checks
    it): a JSON integer passes for a float field, a string never passes for a number or a boolean.
    Only the verdict is used here; ``Preset`` itself stores the values when ``load`` builds it.
    """
    if not isinstance(stored, dict):
        return f"the preset must be an object, got {stored!r}"
    hints = typing.get_type_hints(Preset)
    unknown = sorted(set(stored) - set(hints))
    if unknown:
        return f"the preset has fields this ptq4vit does not know ({', '.join(unknown)}); upgrade ptq4vit"
    for key, value in stored.items():
        try:
            check_value(f"preset field {key}", value, hints[key])
        except UserError as e:
            return str(e)
    return None


def check_data_config(path: str, cfg: Any) -> None:
    """A data config holds only timm eval-transform settings, each of its type."""
    if not isinstance(cfg, dict):
        raise _fail(path, f"data_config must be an object, got {cfg!r}")
    for key, value in cfg.items():
        v = list(value) if isinstance(value, tuple) else value
        if key == "input_size":
            ok, expected = _ints(v, 3, low=1), "three positive integers (channels, height, width)"
        elif key in ("mean", "std"):
            ok = isinstance(v, list) and len(v) > 0 and all(_is_number(x) for x in v)
            ok, expected = ok and (key == "mean" or all(x > 0 for x in v)), "a list of finite numbers (std > 0)"
        elif key == "crop_pct":
            ok, expected = _is_number(v) and 0 < v <= 10, "a number in (0, 10]"
        elif key == "interpolation":
            ok, expected = v in _INTERPOLATIONS, f"one of {', '.join(_INTERPOLATIONS)}"
        elif key == "crop_mode":
            ok, expected = v in _CROP_MODES, f"one of {', '.join(_CROP_MODES)}"
        else:
            raise _fail(path, f"data_config key {key!r} is not one of input_size, interpolation, mean, std, "
                              f"crop_pct, crop_mode")
        if not ok:
            raise _fail(path, f"data_config {key} must be {expected}, got {value!r}")


def _check_structure(path: str, st: Any) -> None:
    if not isinstance(st, dict) or not isinstance(st.get("tensors"), dict) or not isinstance(st.get("sites"), dict):
        raise _fail(path, "metadata structure must be an object with 'tensors' and 'sites' objects")
    for key, entry in st["tensors"].items():
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in DTYPES and _ints(entry[1])):
            raise _fail(path, f"metadata structure entry of tensor {key!r} must be [dtype, shape], got {entry!r}")
    for key, entry in st["sites"].items():
        if not isinstance(entry, dict):
            raise _fail(path, f"metadata structure entry of site {key!r} must be an object, got {entry!r}")


def _check_quantized_weights(path: str, qw: Any) -> None:
    if not isinstance(qw, dict):
        raise _fail(path, "metadata quantized_weights must be an object")
    for site, e in qw.items():
        ok = (isinstance(e, dict) and _is_int(e.get("bits")) and _is_int(e.get("groups")) and e["groups"] > 0
              and (e.get("axis") is None or _is_int(e.get("axis"))) and _ints(e.get("shape")))
        if not ok:
            raise _fail(path, f"metadata quantized_weights entry of {site!r} must have integer bits and groups, "
                              f"axis null or an integer and a shape, got {e!r}")
        try:
            check_bits(e["bits"], f"the recorded weight bits of {site}")
        except UserError as err:
            raise _fail(path, str(err)) from None


def check_metadata(path: str, meta: dict, adapters: AdapterRegistry = DEFAULT_ADAPTERS) -> None:
    """Refuse metadata that ``load`` cannot use as it is: every field it reads, by name (the model
    name must be one an adapter of ``adapters`` rebuilds)."""
    _check_model(path, meta.get("model"), adapters)
    problem = preset_field_problem(meta.get("preset"))
    if problem is not None:
        raise _fail(path, problem)
    if "recipe" in meta:
        try:
            Recipe.from_dict(meta["recipe"])
        except (UserError, TypeError) as e:
            raise _fail(path, f"the stored recipe is not valid: {e}") from None
    for key in ("w_bits", "a_bits"):
        try:
            check_bits(meta.get(key), f"metadata {key}")
        except UserError as e:
            raise _fail(path, str(e)) from None
    _check_quantized_weights(path, meta.get("quantized_weights"))
    if "structure" in meta or meta.get("format_version", 0) >= 2:
        _check_structure(path, meta.get("structure"))
    digest = meta.get("float_weights_sha256")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise _fail(path, f"metadata float_weights_sha256 must be 64 hex digits, got {digest!r}")
    if meta.get("data_config") is not None:
        check_data_config(path, meta["data_config"])


# --------------------------------------------------------------------------------------------
# tensors


def check_tensors_match_structure(path: str, structure: dict, tensors: dict[str, torch.Tensor],
                                  codes_suffix: str) -> None:
    """Every stored tensor has the dtype and shape the metadata's structure records (codes: int8, the weight's shape)."""
    recorded = structure["tensors"]
    for key, t in tensors.items():
        if key.endswith(codes_suffix):
            entry = recorded.get(key[: -len(codes_suffix)] + ".weight")
            want = ["int8", entry[1] if entry else None]
        else:
            want = recorded.get(key)
        got = [str(t.dtype).replace("torch.", ""), list(t.shape)]
        if want is not None and got != want:
            raise _fail(path, f"tensor {key!r} is {got[0]} {got[1]}, the metadata records {want[0]} {want[1]}")


def codes_problem(site_name: str, codes: torch.Tensor, bits: int) -> Optional[str]:
    """Why signed ``bits``-bit weight codes are out of their range ``[-2^(b-1), 2^(b-1) - 1]``, or None."""
    lo, hi = -qmax(bits), qmax(bits) - 1
    n = int(((codes < lo) | (codes > hi)).sum())
    if n:
        return (f"the weight codes of {site_name} lie outside the range of their recorded {bits} bits "
                f"([{lo}, {hi}]): {n} of {codes.numel()} values (min {int(codes.min())}, max {int(codes.max())})")
    return None

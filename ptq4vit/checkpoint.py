"""Quantized checkpoints: one self-describing safetensors file per quantized model.

What a checkpoint holds
-----------------------
* every quantized weight as its integer codes (``int8`` storage for any bit width up to 8),
  under ``<site>.weight_codes``;
* every other tensor of the model as saved: float parameters that stay float (norms,
  biases, embeddings ...) and the quantizers' scales and twin parameters (``*.scale``,
  ``*.split``, ``*.neg_scale`` buffers);
* metadata (safetensors ``__metadata__``, JSON under the key ``ptq4vit``): the timm model name
  and tag, the ``timm.create_model`` keyword arguments that rebuild the float architecture,
  the full preset, the bit widths, the model's structure (:func:`structure`: every tensor's
  name, dtype and shape, every quantization site and the kinds of its quantizers), a digest
  of the float weights the model was quantized from, and the versions that wrote it;
* ``ptq4vit_content_sha256``: a digest of the metadata and of every tensor, checked on load.

:func:`load` rebuilds the float architecture with ``timm.create_model(..., pretrained=False)``,
inserts the quantization sites of the recorded preset, compares its structure with the stored
one (so a timm release that only adds module attributes still loads old checkpoints), and
loads the tensors (read through safetensors' memory map); quantized
weights become ``codes · Δ`` in float32, which is exactly the value fake quantization
produces, so the loaded model's outputs are bit-identical to the model that was saved.
(With quantization disabled the loaded model is therefore *not* the original float model:
its weights are the dequantized ones.)

Anything that does not fit raises :class:`CheckpointError`, a :class:`~ptq4vit.errors.UserError`
with a one-line message: a file that is not safetensors or is truncated, a safetensors file
that is not a ptq4vit checkpoint, a tensor or metadata changed after saving, a float model
(``load(path, model=...)``) with other weights or another architecture than the checkpoint's,
and content that is not sense even though its digest holds (:mod:`.checkpoint_checks`: a model
name without an adapter, ``create_model`` arguments that are not the family's architecture
arguments, metadata that disagrees with the tensors, codes outside their recorded bits; and, by
:mod:`.finite` as after calibration, scales that are not finite and positive). ``save`` refuses what ``load`` would refuse, before writing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
from typing import Any, Optional, Union

import torch
from torch import nn

from .atomic_write import atomic_write_bytes
from .checkpoint_checks import (DTYPES, check_data_config, check_metadata, check_tensors_match_structure,
                                codes_problem)
from .errors import CheckpointError
from .typecheck import checked
from .finite import bad_scale_problem
from .models import DEFAULT_ADAPTERS, AdapterRegistry
from .models.adapter import EVAL_IDENTITIES
from .models.create_args import COMMON_CREATE_ARGS, create_args_problem
from .nn import QUANT_MODULES
from .quant import Quantizer
from .quantized import QuantizedModel
from .recipes import Recipe, from_flat
from .recipes.flat import Preset

FORMAT = "ptq4vit-checkpoint"
#: 2: the structure is stored as data (format 1 stored a digest of timm module attributes).
FORMAT_VERSION = 2
META_KEY = "ptq4vit"
DIGEST_KEY = "ptq4vit_content_sha256"
CODES_SUFFIX = ".weight_codes"

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["CheckpointError", "save", "load", "read_metadata", "data_config", "float_weights_digest", "structure",
           "structure_digest", "content_digest",
           "derive_create_kwargs", "FORMAT", "FORMAT_VERSION"]


# --------------------------------------------------------------------------------------------
# digests


def _update_tensor(h: "hashlib._Hash", name: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(name.encode())
    h.update(b"\0")
    h.update(str(t.dtype).encode())
    h.update(json.dumps(list(t.shape)).encode())
    # view as bytes so that every dtype (bf16 included) hashes without numpy conversion
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _quantizer_prefixes(model: nn.Module) -> tuple[str, ...]:
    return tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, Quantizer))


def float_weights_digest(model: nn.Module) -> str:
    """sha256 of a model's float weights: its state dict without quantizer buffers.

    A float timm model and the :class:`QuantizedModel` calibrated from it have the same
    digest (quantized layers keep the float weights under timm's names), so this identifies
    the float weights a checkpoint came from.
    """
    if isinstance(model, QuantizedModel):
        model = model.model
    skip = _quantizer_prefixes(model)
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if not name.startswith(skip):
            _update_tensor(h, name, t)
    return h.hexdigest()


#: Attributes that say nothing about what a module computes in eval mode (``init_values`` only
#: initialises a LayerScale whose gamma the checkpoint then overwrites).
_IGNORED_ATTRS = {"training", "enabled", "calibrated", "grad_checkpointing", "weight_init_mode", "fix_init", "init_values"}


def _eval_identity(m: nn.Module) -> bool:
    """Modules that are the identity in eval mode."""
    return isinstance(m, EVAL_IDENTITIES)


def _primitive(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, (tuple, list)):
        return all(_primitive(x) for x in v)
    return False


def _architecture_lines(model: nn.Module) -> list[str]:
    """Module types and hyper-parameters (every primitive attribute), then tensor names and shapes.

    Only for checking, inside one process and one timm version, that derived
    ``create_model`` arguments rebuild a model: it reads timm internals, so it is never
    stored in a checkpoint (a timm release that adds an attribute would change it).
    """
    lines = []
    for name, m in model.named_modules():
        if _eval_identity(m):
            lines.append(f"{name}:Identity")
            continue
        attrs = sorted((k, repr(v)) for k, v in vars(m).items()
                       if not k.startswith("_") and k not in _IGNORED_ATTRS and _primitive(v))
        lines.append(f"{name}:{type(m).__name__}:{attrs}")
    for key, t in model.state_dict().items():
        lines.append(f"{key}:{tuple(t.shape)}")
    return lines


def _first_difference(a: list[str], b: list[str]) -> str:
    for x, y in zip(a, b):
        if x != y:
            return f"{x[:160]!r} vs {y[:160]!r}"
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} entries"
    return "none"


def _site_kind(site: nn.Module) -> dict:
    """A site's type and the spec of each of its quantizers (a conv's absent input quantizer left out)."""
    return {"type": type(site).__name__, **{role: q.spec() for role, q in site.quantizers().items()}}


def structure(model: nn.Module) -> dict:
    """What determines a quantized model's computation apart from tensor values, as plain data.

    Every state-dict tensor's name, dtype and shape, and every quantization site with the
    kind of each of its quantizers (type, bits, groups and axis, twin form, power-of-two
    restriction). Nothing else of timm's internals enters, so a timm release that adds a
    module attribute leaves it unchanged. (The preset is stored and compared on its own.)
    """
    if isinstance(model, QuantizedModel):
        model = model.model
    tensors = {k: [str(t.dtype).replace("torch.", ""), list(t.shape)] for k, t in model.state_dict().items()}
    sites = {n: _site_kind(m) for n, m in model.named_modules() if isinstance(m, QUANT_MODULES)}
    return {"tensors": tensors, "sites": sites}


def structure_digest(model: nn.Module) -> str:
    """sha256 of :func:`structure`."""
    return hashlib.sha256(json.dumps(structure(model), sort_keys=True).encode()).hexdigest()


def _structure_difference(saved: dict, rebuilt: dict) -> Optional[str]:
    """The first difference between two :func:`structure` dicts, in words (None if equal)."""
    for part, what in (("tensors", "tensor"), ("sites", "quantization site")):
        a, b = saved.get(part, {}), rebuilt.get(part, {})
        missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        if missing:
            return f"the rebuilt model lacks the {what} {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        if extra:
            return f"the rebuilt model has an extra {what} {extra[0]!r}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        for k in a:
            if a[k] != b[k]:
                return f"{what} {k!r} is {b[k]} in the rebuilt model, {a[k]} in the checkpoint"
    return None


# --------------------------------------------------------------------------------------------
# rebuilding the float architecture


def _accepted(model_class: type, kwargs: dict) -> dict:
    """The arguments ``model_class`` takes (its own and, through ``**kwargs``, its bases').

    Arguments read off a model that an older timm's constructor does not know are dropped:
    that timm cannot build what they would change, and the rebuilt model is compared with the
    real one anyway.
    """
    names: set[str] = set()
    for cls in model_class.__mro__:
        if cls is nn.Module:
            break
        if "__init__" not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters
        names.update(params)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            break
    return {k: v for k, v in kwargs.items() if k in names}


def _kwargs_from_json(kw: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}


def _create_float(name: str, create_kwargs: dict, device: Optional[torch.device] = None, *,
                  adapters: AdapterRegistry = DEFAULT_ADAPTERS) -> nn.Module:
    """The float model ``name`` as its adapter creates it (``timm.create_model(name, pretrained=False,
    **create_kwargs)`` for timm's families), on ``device`` where possible."""
    create = adapters.adapter_for_name(name).create_model
    kwargs = _kwargs_from_json(create_kwargs)
    if device is not None:
        try:
            with torch.device(device):
                return create(name, **kwargs)
        except (RuntimeError, NotImplementedError):
            pass  # timm releases before 1.0.1x initialise with Tensor.item(), which the meta device cannot do
    return create(name, **kwargs)


def _build_quantized(name: str, create_kwargs: dict, preset: "Recipe | Preset", w_bits: int, a_bits: int,
                     device: Optional[torch.device] = None, *,
                     adapters: AdapterRegistry = DEFAULT_ADAPTERS) -> QuantizedModel:
    from .prepare import prepare_sites

    model = _create_float(name, create_kwargs, device, adapters=adapters)
    model.eval()
    prepare_sites(model, preset, w_bits, a_bits, adapters=adapters)
    return QuantizedModel(model, preset, w_bits, a_bits, name)


def derive_create_kwargs(qmodel: QuantizedModel, extra: Optional[dict] = None, *,
                         adapters: AdapterRegistry = DEFAULT_ADAPTERS) -> dict:
    """``timm.create_model`` keyword arguments that rebuild ``qmodel``'s architecture.

    Tries the few arguments everyone changes (``num_classes``, ``img_size``, ``in_chans``),
    then every architectural argument read off the model; each candidate is checked by
    building it (on the meta device, no memory) and comparing its module types, hyper-parameters
    and tensors with the model's (the same timm is on both sides here, so this is strict).
    ``extra`` is merged on top of each candidate (for arguments that cannot be read off a model); it
    may hold only the architecture arguments the model's adapter declares (``create_args``).
    Raises :class:`CheckpointError` when no candidate rebuilds the same structure.
    """
    m = qmodel.model
    adapter = adapters.adapter_for(m)
    if extra:  # checked before anything is built with them: load will pass on nothing else
        try:
            extra = json.loads(json.dumps(extra))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"create_kwargs must be plain JSON values ({e})") from None
        problem = create_args_problem(extra, {**COMMON_CREATE_ARGS, **adapter.create_args})
        if problem is not None:
            raise CheckpointError(f"create_kwargs: {problem}")
    base = adapter.common_create_kwargs(m)
    family = _accepted(type(m), adapter.create_kwargs(m))
    want = _architecture_lines(m)
    candidates = [dict(base), dict(base, **family)]
    last = None
    for cand in candidates:
        cand.update(extra or {})
        try:
            built = _build_quantized(qmodel.name, cand, qmodel.preset, qmodel.w_bits, qmodel.a_bits, torch.device("meta"),
                                     adapters=adapters)
        except Exception as e:  # an argument this architecture does not take
            last = f"timm.create_model({qmodel.name!r}, **{cand}) failed: {e}"
            continue
        got = _architecture_lines(built.model)
        if got == want:
            return cand
        last = f"first difference: {_first_difference(got, want)}"
    raise CheckpointError(
        f"cannot rebuild {qmodel.name!r} from timm.create_model keyword arguments read off the model ({last}); "
        f"pass create_kwargs=... (the arguments the float model was created with) to save()")


# --------------------------------------------------------------------------------------------
# save


def _weight_codes(site: nn.Module) -> torch.Tensor:
    """The integer codes of a site's weight: what its quantizer's forward rounds to."""
    return site.w_quant.codes(site.weight.detach()).to(torch.int8)


def _quantized_weight_sites(qmodel: QuantizedModel) -> dict[str, nn.Module]:
    return {n: s for n, s in qmodel.sites().items() if "w_quant" in s.quantizers()}


def content_digest(meta_json: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of a metadata text and every tensor (names, dtypes, shapes, bytes): a checkpoint's content
    digest, and the runner's check that every torchrun rank holds the same model."""
    h = hashlib.sha256()
    h.update(meta_json.encode())
    for name in sorted(tensors):
        _update_tensor(h, name, tensors[name])
    return h.hexdigest()


def _versions() -> dict:
    import timm
    from . import __version__
    return {"ptq4vit": __version__, "timm": timm.__version__, "torch": torch.__version__.split("+")[0]}


@checked(error=CheckpointError)
def save(qmodel: QuantizedModel, path: PathLike, *, create_kwargs: Optional[dict] = None,
         data_config: Optional[dict] = None, adapters: AdapterRegistry = DEFAULT_ADAPTERS) -> dict:
    """Write ``qmodel`` as one safetensors checkpoint; return its metadata.

    ``create_kwargs`` are extra ``timm.create_model`` arguments for architectures whose
    constructor arguments cannot be read off the model (they are merged into what is derived;
    the result is verified by rebuilding on the meta device before anything is written).
    ``data_config`` (timm's evaluation data config: input size, interpolation, crop, mean/std)
    is stored for tools that evaluate the checkpoint later. ``adapters``: the registry the model was
    quantized with (the one ``load`` will need to rebuild it).
    """
    from safetensors.torch import save as save_tensors

    if not isinstance(qmodel, QuantizedModel):
        raise CheckpointError(f"save() takes a QuantizedModel (from ptq4vit.quantize or ptq4vit.load), got {type(qmodel).__name__}")
    uncalibrated = [n for n, m in qmodel.model.named_modules() if isinstance(m, Quantizer) and not m.calibrated]
    if uncalibrated:
        raise CheckpointError(f"the model has uncalibrated quantizers ({', '.join(uncalibrated[:3])}...); quantize it first")
    bad = bad_scale_problem(qmodel.model)
    if bad is not None:
        raise CheckpointError(f"cannot save {os.fspath(path)}: {bad}; the model's quantization parameters are "
                              f"unusable (calibrate again with finite calibration images)")
    if data_config is not None:
        check_data_config(os.fspath(path), data_config)
    model = qmodel.model
    weight_sites = _quantized_weight_sites(qmodel)
    dtype = next(iter(weight_sites.values())).weight.dtype if weight_sites else torch.float32

    kwargs = derive_create_kwargs(qmodel, create_kwargs, adapters=adapters)

    tensors: dict[str, torch.Tensor] = {}
    codes_keys = {f"{n}.weight" for n in weight_sites}
    for key, t in model.state_dict().items():
        if key not in codes_keys:
            tensors[key] = t.detach().to("cpu").contiguous().clone()
    quantized = {}
    for n, site in weight_sites.items():
        tensors[n + CODES_SUFFIX] = _weight_codes(site).cpu().contiguous()
        wq = site.w_quant
        quantized[n] = {"bits": wq.bits, "groups": wq.groups, "axis": wq.axis, "shape": list(site.weight.shape)}

    cfg = getattr(model, "pretrained_cfg", None) or {}
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "versions": _versions(),
        "model": {"name": qmodel.name, "architecture": cfg.get("architecture"), "tag": cfg.get("tag"),
                  "class": type(model).__name__, "create_kwargs": kwargs, "dtype": str(dtype).replace("torch.", "")},
        "preset": dataclasses.asdict(qmodel.preset), "recipe": qmodel.recipe.to_dict(), "w_bits": qmodel.w_bits, "a_bits": qmodel.a_bits,
        "quantized_weights": quantized,
        "structure": structure(model),
        "float_weights_sha256": qmodel.float_weights_sha256 or float_weights_digest(model),
    }
    if data_config is not None:
        meta["data_config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint metadata cannot be written as JSON ({e}); pass plain values in "
                              f"create_kwargs/data_config") from None
    check_metadata(os.fspath(path), json.loads(meta_json), adapters)  # never write a file that load would refuse
    digest = content_digest(meta_json, tensors)
    # safetensors' own save_file writes through a private temporary file created 0600; serialising
    # to bytes lets atomic_write give the file the umask's mode and clean up after any failure.
    data = save_tensors(tensors, metadata={"format": "pt", META_KEY: meta_json, DIGEST_KEY: digest})
    atomic_write_bytes(path, data, what="checkpoint", error=CheckpointError)
    return meta


# --------------------------------------------------------------------------------------------
# load


def _read(path: PathLike, adapters: AdapterRegistry = DEFAULT_ADAPTERS) -> tuple[dict, str, dict[str, torch.Tensor]]:
    """Metadata, its JSON text and every tensor of a checkpoint, read through safetensors'
    memory map, after checking that the file is a ptq4vit checkpoint and unchanged."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} {'is not a file' if os.path.exists(path) else 'does not exist'}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            file_meta = f.metadata() or {}
            if META_KEY not in file_meta:
                raise CheckpointError(
                    f"{path} is a safetensors file but not a ptq4vit checkpoint (no '{META_KEY}' metadata); "
                    f"float timm weights are loaded with safetensors + load_state_dict, not ptq4vit.load")
            meta = _parse_meta(path, file_meta[META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a safetensors file, or is truncated or corrupt ({e})") from None
    digest = content_digest(file_meta[META_KEY], tensors)
    if digest != file_meta.get(DIGEST_KEY):
        raise CheckpointError(f"{path} was modified after it was saved: its content digest is {digest[:16]}..., "
                              f"the recorded one {str(file_meta.get(DIGEST_KEY))[:16]}... (a tensor or the metadata changed)")
    check_metadata(path, meta, adapters)
    if "structure" in meta:
        check_tensors_match_structure(path, meta["structure"], tensors, CODES_SUFFIX)
    return meta, file_meta[META_KEY], tensors


def _parse_meta(path: str, text: str) -> dict:
    try:
        meta = json.loads(text)
    except ValueError:
        raise CheckpointError(f"{path}: the ptq4vit metadata is not valid JSON (corrupt or edited)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {meta.get('format_version')}; this ptq4vit reads "
                              f"up to version {FORMAT_VERSION} (upgrade ptq4vit)")
    return meta


def data_config(meta: dict, model: Optional[nn.Module] = None) -> dict:
    """The evaluation data config of a checkpoint: the stored one, else timm's for the model
    (``resolve_data_config``), with the input size of the checkpoint's ``img_size``."""
    stored = meta.get("data_config")
    if stored:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
    from timm.data import resolve_data_config

    if model is None:
        model = load_skeleton_float(meta)
    cfg = dict(resolve_data_config({}, model=model.model if isinstance(model, QuantizedModel) else model))
    img = (meta["model"].get("create_kwargs") or {}).get("img_size")
    if img is not None:
        cfg["input_size"] = (3, *((img, img) if isinstance(img, int) else tuple(img)))
    return cfg


def load_skeleton_float(meta: dict, *, adapters: AdapterRegistry = DEFAULT_ADAPTERS) -> nn.Module:
    """The float architecture of a checkpoint, on the meta device where timm allows it (no memory, no weights)."""
    return _create_float(meta["model"]["name"], meta["model"]["create_kwargs"], torch.device("meta"), adapters=adapters)


@checked(error=CheckpointError)
def read_metadata(path: PathLike, *, adapters: AdapterRegistry = DEFAULT_ADAPTERS) -> dict:
    """The checkpoint's metadata (after checking its digest and that an adapter of ``adapters`` rebuilds it)."""
    return _read(path, adapters)[0]


def _recipe_from(path: str, meta: dict) -> Recipe:
    """The stored recipe; files without one (format 1, and format 2 before recipes) store only the
    flat preset, read as the recipe it means. The flat preset stored beside a recipe must be its view.
    (Field types are checked by ``check_metadata``; the combination here by the recipe itself.)"""
    try:
        flat = Preset(**meta["preset"])
        if "recipe" not in meta:
            return from_flat(flat)
        recipe = Recipe.from_dict(meta["recipe"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the checkpoint's preset is not valid: {e}") from None
    if recipe.flat() != flat:
        raise CheckpointError(f"{path}: the checkpoint's recipe and its flat preset disagree (the file was edited)")
    return recipe


def _match_dtypes(model: nn.Module, meta: dict) -> None:
    """Give every parameter and buffer the dtype it was saved with (format 1: one dtype for all)."""
    saved = {k: DTYPES[v[0]] for k, v in meta["structure"]["tensors"].items()} if "structure" in meta else None
    if saved is None:
        model.to(DTYPES[meta["model"].get("dtype", "float32")])
        return
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for store in (mod._parameters, mod._buffers):
            for k, t in store.items():
                want = saved.get(prefix + k)
                if t is not None and want is not None and t.dtype != want:
                    if isinstance(t, nn.Parameter):
                        t.data = t.data.to(want)
                    else:
                        store[k] = t.to(want)


@checked(error=CheckpointError)
def load(path: PathLike, model: Optional[nn.Module] = None, *, map_location: Union[str, torch.device] = "cpu",
         adapters: AdapterRegistry = DEFAULT_ADAPTERS) -> QuantizedModel:
    """Rebuild the quantized model saved at ``path``.

    Without ``model`` the float architecture is created with
    ``timm.create_model(name, pretrained=False, **create_kwargs)`` from the checkpoint's
    metadata. With ``model`` (the float timm model the checkpoint was quantized from; it is
    not modified) that model is used as the skeleton instead: its float weights must be the
    ones the checkpoint records, and its architecture the checkpoint's.

    ``adapters``: the registry the model was quantized and saved with; the model name's adapter in
    it creates the float architecture and inserts the sites.

    The result computes exactly what the saved model computed (bit-identical outputs).
    """
    path = os.fspath(path)
    meta, _, tensors = _read(path, adapters)
    preset = _recipe_from(path, meta)
    w_bits, a_bits = meta["w_bits"], meta["a_bits"]
    info = meta["model"]
    name = info["name"]
    if model is not None:
        import copy
        from .prepare import prepare_sites

        if isinstance(model, QuantizedModel):
            raise CheckpointError("load(path, model=...) takes the float timm model, not a QuantizedModel")
        got = float_weights_digest(model)
        if got != meta["float_weights_sha256"]:
            raise CheckpointError(
                f"{os.fspath(path)} was quantized from other float weights than the given model's "
                f"({name}, float weights sha256 {meta['float_weights_sha256'][:16]}...; the given "
                f"{type(model).__name__} has {got[:16]}...)")
        skeleton = copy.deepcopy(model).eval()
        try:
            prepare_sites(skeleton, preset, w_bits, a_bits, adapters=adapters)
        except ValueError as e:
            raise CheckpointError(f"the given model cannot take this checkpoint: {e}") from None
        qmodel = QuantizedModel(skeleton, preset, w_bits, a_bits, adapters.adapter_for(model).model_name(model))
    else:
        try:
            qmodel = _build_quantized(name, info["create_kwargs"], preset, w_bits, a_bits, adapters=adapters)
        except Exception as e:
            raise CheckpointError(f"cannot rebuild {name!r} with timm.create_model(pretrained=False, "
                                  f"**{info['create_kwargs']}): {e}") from None
    qmodel.float_weights_sha256 = meta["float_weights_sha256"]
    _match_dtypes(qmodel.model, meta)
    if "structure" in meta:  # format 1 files carry a digest of timm internals instead: not compared
        diff = _structure_difference(meta["structure"], structure(qmodel))
        if diff is not None:
            raise CheckpointError(
                f"the rebuilt {name!r} differs from the model that was saved: {diff} (saved with "
                f"{meta.get('versions')})")
    sites = _quantized_weight_sites(qmodel)
    if set(sites) != set(meta["quantized_weights"]):
        raise CheckpointError(f"the checkpoint's quantized weights do not match the rebuilt model's sites "
                              f"({sorted(set(sites) ^ set(meta['quantized_weights']))[:4]})")
    for n, site in sites.items():
        wq, recorded = site.w_quant, meta["quantized_weights"][n]
        rebuilt = {"bits": wq.bits, "groups": wq.groups, "axis": wq.axis, "shape": list(site.weight.shape)}
        if recorded != rebuilt:
            raise CheckpointError(f"{path}: the recorded quantized weight {n} is {recorded}, the preset and bits "
                                  f"recorded rebuild {rebuilt}")
    state = {}
    for key, t in tensors.items():
        if key.endswith(CODES_SUFFIX):
            continue
        state[key] = t
    for n, site in sites.items():
        codes = tensors.get(n + CODES_SUFFIX)
        if codes is None or codes.dtype != torch.int8 or tuple(codes.shape) != tuple(site.weight.shape):
            raise CheckpointError(f"the checkpoint's codes for {n} are missing or have the wrong type/shape")
        state[n + ".weight"] = codes  # placeholder so strict loading sees every key; replaced below
    expected = set(qmodel.model.state_dict())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise CheckpointError(f"the checkpoint's tensors do not match the rebuilt model (missing {missing[:3]}, "
                              f"unexpected {extra[:3]})")
    for n in sites:
        del state[n + ".weight"]
    try:
        qmodel.model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"the checkpoint's tensors do not fit the rebuilt model: {e}") from None
    bad = bad_scale_problem(qmodel.model)
    if bad is not None:
        raise CheckpointError(f"{path}: {bad}; the checkpoint's quantization parameters are unusable")
    for n, site in sites.items():
        problem = codes_problem(n, tensors[n + CODES_SUFFIX], site.w_quant.bits)
        if problem is not None:
            raise CheckpointError(f"{path}: {problem}; the metadata disagrees with the tensors")
    with torch.no_grad():
        for n, site in sites.items():  # scales are loaded now, so dequantize with them
            site.weight.copy_(site.w_quant.dequantize(tensors[n + CODES_SUFFIX], site.weight.dtype))
    for q in qmodel.quantizers():
        q.calibrated = True
    qmodel.to(map_location)
    qmodel.eval()
    return qmodel

"""Model names: the paper's short names, pinned timm names, and local weights (docs/method.md §6).

``resolve("ViT-S/224")`` gives the pinned timm name (``vit_small_patch16_224.augreg_in21k_ft_in1k``);
any timm name, with or without a pretrained tag, works too. :func:`create` builds the model with
hub weights, with a local ``weights`` file (safetensors or a torch state dict, no hub needed), or
randomly initialised, and resolves the model's evaluation transform from timm's pretrained config.

``vit_s14_cifar10`` is the real ViT-S/14 CIFAR-10 classifier of the shared test models: pass
``weights=`` its safetensors file or the folder holding it. ``vit_s14_cifar10_hf`` is the same
weights in Hugging Face ``transformers``' ``Dinov2ForImageClassification`` (converted by
:mod:`.hf_convert`).

Hugging Face entries (``builder="hf"``) name a ``transformers`` model class and its architecture
(config keys, as the class's ptq4vit adapter lists them); they are built from that config, never
downloaded: local weights (a ``transformers`` state dict) or random init. The float model returns
the tensor its quantized twin returns (``logits``, or a backbone's pooled output).
"""
from __future__ import annotations

import difflib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import UserError
from .hf_convert import timm_dinov2_to_hf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The ViT-S/14 CIFAR-10 classifier's evaluation transform (its README).
_CIFAR_S14 = dict(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=1.0, crop_mode="squash",
                  mean=IMAGENET_MEAN, std=IMAGENET_STD)
#: What transformers' image processors of these models do: resize to the size, no crop.
_HF_VIT_DATA = dict(input_size=(3, 224, 224), interpolation="bilinear", crop_pct=1.0, crop_mode="squash",
                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
_HF_IMAGENET_DATA = dict(_HF_VIT_DATA, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)
_HF_BASE = dict(img_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, num_classes=1000)
#: CLIPImageProcessor: the shorter side to 224 (bicubic), a 224 center crop, OpenAI's mean and std.
_HF_CLIP_DATA = dict(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=1.0, crop_mode="center",
                     mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
#: A B/16 image tower (no classifier: CLIP and SigLIP towers output an embedding).
_HF_TOWER = dict(img_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072)
_HF_S14 = dict(img_size=224, patch_size=14, hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4)


@dataclass(frozen=True)
class ModelEntry:
    """A named model: the paper's short name, its pinned timm name, and what else it needs."""
    short: str
    timm_name: str
    description: str = ""
    aliases: tuple = ()
    #: Extra ``timm.create_model`` kwargs (e.g. ``num_classes`` of a local classifier).
    kwargs: dict = field(default_factory=dict)
    #: Replaces timm's resolved data config keys (e.g. a squash resize for CIFAR).
    data_config: dict = field(default_factory=dict)
    #: File name looked up when ``weights`` is a folder.
    weights_file: Optional[str] = None
    #: No hub weights exist: a local weights file is required (or random init).
    local_only: bool = False
    #: The model appears in the paper's tables (docs/method.md §7).
    in_paper: bool = False
    #: Who builds ``timm_name``: ``"timm"``; ``"hf"``: a ``transformers`` model class built from ``kwargs``;
    #: or another library whose model classes a ptq4vit adapter builds itself (``Adapter.create_model``;
    #: never with downloaded weights: ``--weights FILE`` or random init).
    builder: str = "timm"
    #: Maps the weights file's state dict to the model's (a file of another library's layout).
    convert: Optional[Callable[[dict], dict]] = None


MODELS: tuple[ModelEntry, ...] = (
    ModelEntry("ViT-Ti/224", "vit_tiny_patch16_224.augreg_in21k_ft_in1k", "ViT-Ti/16, AugReg in21k→in1k"),
    ModelEntry("ViT-S/224/32", "vit_small_patch32_224.augreg_in21k_ft_in1k", "ViT-S/32, AugReg in21k→in1k",
               in_paper=True),
    ModelEntry("ViT-S/224", "vit_small_patch16_224.augreg_in21k_ft_in1k", "ViT-S/16, AugReg in21k→in1k",
               in_paper=True),
    ModelEntry("ViT-B/224", "vit_base_patch16_224.augreg_in21k_ft_in1k", "ViT-B/16, AugReg in21k→in1k",
               in_paper=True),
    ModelEntry("ViT-B/384", "vit_base_patch16_384.augreg_in21k_ft_in1k", "ViT-B/16 at 384, AugReg in21k→in1k",
               in_paper=True),
    ModelEntry("DeiT-Ti/224", "deit_tiny_patch16_224.fb_in1k", "DeiT-Ti"),
    ModelEntry("DeiT-S/224", "deit_small_patch16_224.fb_in1k", "DeiT-S", in_paper=True),
    ModelEntry("DeiT-B/224", "deit_base_patch16_224.fb_in1k", "DeiT-B", in_paper=True),
    ModelEntry("DeiT-B/384", "deit_base_patch16_384.fb_in1k", "DeiT-B at 384", in_paper=True),
    # The paper's Swin-T/S are the in1k models; its Swin-B numbers (85.27, 86.44) are the in22k→in1k ones.
    ModelEntry("Swin-T/224", "swin_tiny_patch4_window7_224.ms_in1k", "Swin-T, in1k", in_paper=True),
    ModelEntry("Swin-S/224", "swin_small_patch4_window7_224.ms_in1k", "Swin-S, in1k", in_paper=True),
    ModelEntry("Swin-B/224", "swin_base_patch4_window7_224.ms_in22k_ft_in1k", "Swin-B, in22k→in1k", in_paper=True),
    ModelEntry("Swin-B/384", "swin_base_patch4_window12_384.ms_in22k_ft_in1k", "Swin-B at 384, in22k→in1k",
               in_paper=True),
    # Families beyond the paper's (docs/models.md): one entry each.
    ModelEntry("BEiT-B/224", "beit_base_patch16_224.in22k_ft_in22k_in1k", "BEiT-B/16, in22k→in1k"),
    ModelEntry("SwinV2-T/256", "swinv2_tiny_window8_256.ms_in1k", "Swin V2-T, window 8, in1k"),
    ModelEntry("EVA02-Ti/336", "eva02_tiny_patch14_336.mim_in22k_ft_in1k", "EVA-02 Ti/14 at 336, MIM in22k→in1k"),
    ModelEntry("SigLIP-B/224", "vit_base_patch16_siglip_224.v2_webli",
               "SigLIP 2 B/16 image tower (attention-pool head, image embeddings: no classifier)"),
    ModelEntry("ViT-S/14-CIFAR10", "vit_small_patch14_dinov2",
               "real ViT-S/14 (DINOv2-derived) backbone + CIFAR-10 linear head; local weights only",
               aliases=("vit_s14_cifar10", "vit_small_patch14_dinov2_focus_cifar10"),
               kwargs=dict(img_size=224, num_classes=10),
               data_config=_CIFAR_S14,
               weights_file="vit_small_patch14_dinov2_focus_cifar10.safetensors", local_only=True),
    *(ModelEntry(name, name, f"torchvision {label}; weights: --weights FILE (torchvision's state dict)",
                 builder="torchvision", local_only=True,
                 data_config=dict(interpolation="bilinear", crop_pct=0.875, crop_mode="center", mean=IMAGENET_MEAN,
                                  std=IMAGENET_STD))
      for name, label in (("vit_b_16", "ViT-B/16"), ("vit_b_32", "ViT-B/32"), ("vit_l_16", "ViT-L/16"),
                          ("vit_l_32", "ViT-L/32"), ("vit_h_14", "ViT-H/14"))),
    ModelEntry("HF-ViT-S/14-CIFAR10", "Dinov2ForImageClassification",
               "the ViT-S/14 CIFAR-10 classifier as Hugging Face Dinov2ForImageClassification (weights converted "
               "from the timm file); local weights only", aliases=("vit_s14_cifar10_hf",),
               kwargs=dict(_HF_S14, num_classes=10), data_config=_CIFAR_S14,
               weights_file="vit_small_patch14_dinov2_focus_cifar10.safetensors", local_only=True, builder="hf",
               convert=timm_dinov2_to_hf),
    ModelEntry("HF-ViT-B/224", "ViTForImageClassification", "Hugging Face ViT-B/16 (google/vit-base-patch16-224 "
               "layout); local weights or random init", kwargs=_HF_BASE, data_config=_HF_VIT_DATA,
               local_only=True, builder="hf"),
    ModelEntry("HF-DeiT-S/224", "DeiTForImageClassificationWithTeacher", "Hugging Face distilled DeiT-S "
               "(facebook/deit-small-distilled-patch16-224 layout); local weights or random init",
               kwargs=dict(_HF_BASE, hidden_size=384, num_attention_heads=6, intermediate_size=1536),
               data_config=_HF_IMAGENET_DATA, local_only=True, builder="hf"),
    ModelEntry("HF-DINOv2-S/14", "Dinov2Model", "Hugging Face DINOv2-S/14 backbone at 224 (facebook/dinov2-small "
               "layout; outputs the pooled features); local weights or random init", kwargs=_HF_S14,
               data_config=_HF_IMAGENET_DATA, local_only=True, builder="hf"),
    # torchvision's Swin builders, with their evaluation transforms (resize, then center crop)
    *(ModelEntry(name, name, f"torchvision {label}; weights: --weights FILE (torchvision's state dict)",
                 builder="torchvision", local_only=True,
                 data_config=dict(input_size=(3, crop, crop), interpolation="bicubic", crop_pct=crop / resize,
                                  crop_mode="center", mean=IMAGENET_MEAN, std=IMAGENET_STD))
      for name, label, resize, crop in (("swin_t", "Swin-T", 232, 224), ("swin_s", "Swin-S", 246, 224),
                                        ("swin_b", "Swin-B", 238, 224), ("swin_v2_t", "Swin V2-T", 260, 256),
                                        ("swin_v2_s", "Swin V2-S", 260, 256), ("swin_v2_b", "Swin V2-B", 272, 256))),
    ModelEntry("HF-Swin-T/224", "SwinForImageClassification", "Hugging Face Swin-T (microsoft/swin-tiny-patch4-"
               "window7-224 layout); local weights or random init",
               kwargs=dict(img_size=224, patch_size=4, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                           window_size=7, num_classes=1000),
               data_config=_HF_IMAGENET_DATA, local_only=True, builder="hf"),
    ModelEntry("HF-CLIP-B/16", "CLIPVisionModelWithProjection", "Hugging Face CLIP ViT-B/16 image tower "
               "(openai/clip-vit-base-patch16 layout, QuickGELU; outputs the image embedding); local weights or "
               "random init", kwargs=dict(_HF_TOWER, projection_dim=512, hidden_act="quick_gelu"),
               data_config=_HF_CLIP_DATA, local_only=True, builder="hf"),
    ModelEntry("HF-SigLIP-B/16", "SiglipVisionModel", "Hugging Face SigLIP B/16 image tower "
               "(google/siglip-base-patch16-224 layout, attention-pool head; outputs the image embedding); local "
               "weights or random init", kwargs=dict(_HF_TOWER, hidden_act="gelu_pytorch_tanh"),
               data_config=dict(_HF_VIT_DATA, interpolation="bicubic"), local_only=True, builder="hf"),
)


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-/]", "", name.lower())


_BY_KEY: dict[str, ModelEntry] = {}
for _e in MODELS:
    for _n in (_e.short, *_e.aliases):
        _BY_KEY[_norm(_n)] = _e


def paper_models() -> list[str]:
    """Short names of the models in the paper's tables, in the paper's order."""
    return [e.short for e in MODELS if e.in_paper]


def lookup(name: str) -> Optional[ModelEntry]:
    """The named entry for a short name or alias (case, ``-``, ``_`` and ``/`` ignored), or a pinned timm name."""
    e = _BY_KEY.get(_norm(name))
    if e is not None:
        return e
    for e in MODELS:
        if name == e.timm_name and e.builder == "timm":
            return e
    return None


def resolve(name: str) -> ModelEntry:
    """An entry for a short name, alias or timm name (``arch`` or ``arch.tag``); unknown names raise UserError."""
    import timm
    if not name or not name.strip():
        raise UserError("empty model name")
    name = name.strip()
    e = lookup(name)
    if e is not None:
        return e
    adapter_built = _adapter_built(name)
    if adapter_built is not None:
        return adapter_built
    arch, _, tag = name.partition(".")
    if timm.is_model(arch):
        if tag and not timm.list_pretrained(name):
            tags = [n.partition(".")[2] for n in timm.list_pretrained(arch + ".*")]
            raise UserError(f"unknown pretrained tag {tag!r} for timm model {arch}"
                            + (f"; known tags: {', '.join(tags)}" if tags else ""))
        return ModelEntry(short=name, timm_name=name, description="timm model")
    choices = [e.short for e in MODELS] + [a for e in MODELS for a in e.aliases]
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    close += [m for m in difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.8) if m not in close]
    hint = f"; did you mean {', '.join(close)}?" if close else "; `ptq4vit models` lists the short names"
    raise UserError(f"unknown model {name!r}: neither a short name ({', '.join(e.short for e in MODELS[:3])}, ...) "
                    f"nor a timm model name{hint}")


def _adapter_built(name: str) -> Optional[ModelEntry]:
    """An entry for a model name that a ptq4vit adapter builds itself (``torchvision_VisionTransformer``:
    any size through ``--model-kwargs``), or None."""
    from ..models import DEFAULT_ADAPTERS
    for adapter in DEFAULT_ADAPTERS.adapters:
        if name in adapter.architectures:
            library = adapter.family.partition(" ")[0]
            return ModelEntry(short=name, timm_name=name, description=f"{adapter.family} model", builder=library,
                              local_only=True)
    return None


# --------------------------------------------------------------------------- weights files


def load_state_dict_file(path) -> dict:
    """A state dict from a safetensors file or a torch checkpoint (``state_dict``/``model`` wrappers and
    a ``module.`` prefix removed); floating tensors are cast to float32."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read weights file {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if isinstance(sd, nn.Module):
        sd = sd.state_dict()
    if isinstance(sd, dict):
        for k in ("state_dict", "model", "state_dict_ema", "model_ema"):
            if k in sd and isinstance(sd[k], dict) and not isinstance(sd[k], torch.Tensor):
                sd = sd[k]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def find_weights(entry: ModelEntry, weights) -> Path:
    """``weights`` as a file, or the entry's file inside ``weights`` when it is a folder."""
    p = Path(weights).expanduser()
    if p.is_dir():
        arch = entry.timm_name.partition(".")[0]
        names = [n for n in (entry.weights_file, f"{entry.timm_name}.safetensors", f"{arch}.safetensors",
                             f"{entry.timm_name}.pth", f"{arch}.pth", f"{arch}.bin") if n]
        for n in names:
            if (p / n).is_file():
                return p / n
        raise UserError(f"weights folder {p} has no weights for {entry.short} (looked for {', '.join(names)})")
    if not p.exists():
        raise UserError(f"weights file {p} does not exist")
    return p


def _load_into(model: nn.Module, sd: dict, path: Path, name: str) -> None:
    try:
        model.load_state_dict(sd, strict=True)
        return
    except RuntimeError as first:
        # Original-format checkpoints (e.g. the DeiT/Swin releases): timm's own converter, if any.
        filt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if filt is not None:
            try:
                model.load_state_dict(filt(sd, model), strict=True)
                return
            except Exception:
                pass
        own = model.state_dict()
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in sd and sd[k].shape != v.shape]
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                parts.append(f"{label}: {', '.join(items[:3])}" + (f" (+{len(items) - 3} more)" if len(items) > 3 else ""))
        raise UserError(f"weights file {path} does not fit model {name}: {'; '.join(parts) or str(first).splitlines()[0]}") from None


# --------------------------------------------------------------------------- model creation


@dataclass
class LoadedModel:
    model: nn.Module
    entry: ModelEntry
    #: timm architecture and pretrained tag actually used (tag ``None`` for random init / local weights of a
    #: model with no tag).
    timm_name: str
    tag: Optional[str]
    #: ``"hub"``, ``"random-init"`` or the weights file path.
    weights: str
    kwargs: dict
    data_config: dict

    @property
    def name(self) -> str:
        return self.entry.short

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", None) or getattr(self.model, "num_labels", 0) or 0)

    def transform(self):
        from .data import eval_transform
        return eval_transform(self.data_config)


#: Seconds the one request that asks whether the model hub answers may take (timm's own download retries
#: an unreachable hub for about a minute before it gives up).
HUB_PROBE_TIMEOUT = 5.0
_hub_reachable: dict = {}


def _hub_offline() -> bool:
    from huggingface_hub import constants
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or env.strip().lower() in ("1", "on", "yes", "true")


def _hub_answers(url: str) -> Optional[str]:
    """None if the hub answers a HEAD request for ``url`` (any HTTP status), else why not. One request,
    no retries; the answer is kept for the process."""
    host = url.split("/")[2]
    if host not in _hub_reachable:
        from huggingface_hub import get_session
        try:
            get_session().head(url, timeout=HUB_PROBE_TIMEOUT)
            _hub_reachable[host] = None
        except Exception as e:  # connection, DNS, proxy and timeout errors of requests or httpx
            _hub_reachable[host] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no answer'}"
    return _hub_reachable[host]


def check_hub_weights(entry: ModelEntry) -> None:
    """Refuse at once (UserError) a model whose pretrained weights are neither in the local Hugging Face cache
    nor reachable: the hub is offline (``HF_HUB_OFFLINE=1``) or does not answer one short request."""
    try:
        from huggingface_hub import hf_hub_url, try_to_load_from_cache
        from timm.models import get_pretrained_cfg
    except ImportError:
        return  # timm downloads by URL without huggingface_hub: nothing to ask in advance
    cfg = get_pretrained_cfg(entry.timm_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return
    repo, _, revision = hub_id.partition("@")
    names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else ["model.safetensors", "pytorch_model.bin"]
    if any(isinstance(try_to_load_from_cache(repo, n, revision=revision or None), str) for n in names):
        return
    fix = "pass --weights FILE (a local copy), or download them once where the hub is reachable"
    if _hub_offline():
        raise UserError(f"the weights of {entry.timm_name} are not in the local Hugging Face cache and the hub is "
                        f"offline (HF_HUB_OFFLINE is set): {fix}")
    why = _hub_answers(hf_hub_url(repo, names[0], revision=revision or None))
    if why is not None:
        raise UserError(f"the weights of {entry.timm_name} are not in the local Hugging Face cache and the hub "
                        f"does not answer ({why}): {fix}")


def create(name: str, *, weights=None, pretrained: bool = True, model_kwargs: Optional[dict] = None,
           init_seed: int = 0) -> LoadedModel:
    """Build a model by name, in eval mode, with its evaluation data config.

    ``weights``: a local state-dict file (or a folder holding the entry's file); no hub is contacted.
    ``pretrained=False`` with no ``weights`` gives a randomly initialised model (tests, smoke runs).
    ``model_kwargs`` go to ``timm.create_model`` (e.g. ``img_size``, ``depth`` for tiny test models).
    ``init_seed`` seeds the random initialisation (without touching the global RNG), so a random-init
    model can be re-created exactly.
    """
    entry = resolve(name)
    kwargs = {**entry.kwargs, **(model_kwargs or {})}
    if weights is None and pretrained and entry.local_only:
        hint = f" ({entry.weights_file} or the folder holding it)" if entry.weights_file else ""
        raise UserError(f"model {entry.short} has no hub weights: pass --weights FILE{hint}")
    path = None
    if weights is not None:
        path = find_weights(entry, weights)
    use_hub = pretrained and path is None
    if use_hub:
        check_hub_weights(entry)
    if entry.builder == "hf":
        model = _create_hf(entry, kwargs, init_seed)
    else:
        model = _create_timm(entry, kwargs, init_seed, use_hub)
    if path is not None:
        sd = load_state_dict_file(path)
        _load_into(model, entry.convert(sd) if entry.convert else sd, path, entry.short)
    model.eval()
    arch = entry.timm_name.partition(".")[0]
    tag = getattr(model, "pretrained_cfg", {}).get("tag") if (use_hub or (path is not None and not entry.local_only)) else None
    return LoadedModel(model=model, entry=entry, timm_name=arch, tag=tag,
                       weights="hub" if use_hub else ("random-init" if path is None else str(path)),
                       kwargs=kwargs, data_config=data_config(model, entry, kwargs))


def _create_hf(entry: ModelEntry, kwargs: dict, init_seed: int) -> nn.Module:
    """A ``transformers`` model built from its config by its ptq4vit adapter (the allowed architecture keys
    only: nothing is downloaded or read), returning the tensor its quantized twin returns."""
    from ..models import DEFAULT_ADAPTERS
    from ..models.create_args import COMMON_CREATE_ARGS, create_args_problem
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError(f"model {entry.short} needs Hugging Face transformers: pip install 'ptq4vit[hf]'") from None
    adapter = DEFAULT_ADAPTERS.adapter_for_name(entry.timm_name)
    problem = create_args_problem(kwargs, {**COMMON_CREATE_ARGS, **adapter.create_args})
    if problem is not None:
        raise UserError(f"bad model options for {entry.timm_name}: {problem}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = adapter.create_model(entry.timm_name, **kwargs)
    adapter.return_tensor(model)
    return model


def _create_timm(entry: ModelEntry, kwargs: dict, init_seed: int, use_hub: bool) -> nn.Module:
    import timm
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            if entry.builder == "timm":
                return timm.create_model(entry.timm_name, pretrained=use_hub, **kwargs)
            # local_only: no hub weights, so nothing is downloaded
            from ..models import DEFAULT_ADAPTERS
            return DEFAULT_ADAPTERS.adapter_for_name(entry.timm_name).create_model(entry.timm_name, **kwargs)
    except TypeError as e:
        raise UserError(f"bad model options for {entry.timm_name}: {e}") from None
    except (RuntimeError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if use_hub:
            raise UserError(f"cannot load pretrained weights for {entry.timm_name} ({first}); "
                            f"pass --weights FILE to use a local checkpoint") from None
        raise UserError(f"cannot create model {entry.timm_name}: {first}") from None
    except Exception as e:  # hub/network errors come in many types
        if use_hub:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load pretrained weights for {entry.timm_name} ({type(e).__name__}: {first}); "
                            f"pass --weights FILE to use a local checkpoint") from None
        raise


def data_config(model: nn.Module, entry: Optional[ModelEntry] = None, kwargs: Optional[dict] = None) -> dict:
    """timm's evaluation data config for ``model`` (docs/method.md §6), with the entry's overrides and the input size
    following an ``img_size`` model option."""
    from timm.data import resolve_data_config
    cfg = dict(resolve_data_config({}, model=model))
    if entry is not None:
        cfg.update(entry.data_config)
    img_size = (kwargs or {}).get("img_size", getattr(model, "image_size", None))  # torchvision names it image_size
    if img_size is not None:
        hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        cfg["input_size"] = (3, *hw)
    return cfg


def describe_models() -> str:
    """A text table of the named models."""
    rows = [("short name", "timm name, transformers class or (library)", "notes")]
    for e in MODELS:
        notes = e.description + (f" (aliases: {', '.join(e.aliases)})" if e.aliases else "")
        rows.append((e.short, e.timm_name if e.timm_name != e.short else f"({e.builder})", notes))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)


def shared_dir() -> Path:
    """The read-only shared data folder: ``$PTQ4VIT_SHARED`` or ``../shared`` next to the repository."""
    env = os.environ.get("PTQ4VIT_SHARED")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared"  # ptq4vit/harness/zoo.py -> the repository's parent

"""Adapter for Hugging Face ``transformers``' ViT, DeiT and DINOv2 image models (one layout, three families).

Models: ``ViTForImageClassification``, ``ViTModel``, ``DeiTForImageClassification``,
``DeiTForImageClassificationWithTeacher``, ``DeiTModel``, ``Dinov2ForImageClassification``,
``Dinov2Model``. ``transformers`` is optional: the classes are named by module path, so ptq4vit
imports without it, and it is imported only once a model of it is planned or rebuilt.

Quantization sites (docs/method.md §1), as in timm's ViT: the patch-embedding conv, every layer's
q/k/v projections fused into one ``qkv`` site (see :mod:`.hf_attention`), the output projection,
the two attention matmuls, fc1 and fc2 of the MLP, the pooler's dense layer (ViT/DeiT backbones
built with one) and the classifier(s). Stays float: CLS / distillation / mask tokens and position
embeddings, layer norms, DINOv2's LayerScale, dropouts and stochastic depth, the pooler's tanh.
Refused by name: DINOv2's SwiGLU MLP, any other layer / attention / MLP class, a stray Linear or
Conv. The rotations (``rotq``) fold into the three q/k/v layers (:mod:`.hf_vit_rotation`); what they
leave is planned too: RMS norms, an identity for a folded LayerScale, the online rotation after the
MLP's activation.

The quantized model returns one tensor (what calibration, evaluation and export read): the
classifier models' ``logits``, a backbone's ``pooler_output`` (``last_hidden_state`` for a ViT/DeiT
backbone built without a pooler).

A checkpoint rebuilds the float model from a config of the family's config class, with only the
architecture keys listed in ``create_args`` (never ``from_pretrained``, a hub name, a file or
remote code).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..transforms.modules import OnlineRotation
from ..transforms.rotation_layout import RotationLayout
from .adapter import DROPOUTS, NORMS, Adapter, SitePlan, check_affine_norm, child_paths
from .create_args import BOOL, POSITIVE_INT, POSITIVE_NUMBER, SIZE, ArgKind, one_of
from .hf_attention import QuantHFAttention, fused_qkv
from .hf_output import TensorOutputPlan, return_tensor
from .hf_vit_rotation import hf_vit_rotation_layout
from .sites import SiteBuilder

#: ``hidden_act`` values a rebuilt model may take (``transformers``' names of elementwise activations).
HIDDEN_ACTS = one_of("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu")
#: ``transformers.activations`` classes that are an MLP activation (elementwise, no weights).
_ACTIVATION_NAMES = ("GELUActivation", "NewGELUActivation", "FastGELUActivation", "PytorchGELUTanh", "GELUTanh",
                     "QuickGELUActivation", "SiLUActivation")


def hf_class(module: str, name: str) -> type:
    """The class ``name`` of the ``transformers`` module ``module`` (imports transformers)."""
    return getattr(importlib.import_module(module), name)


def hf_activations() -> tuple[type, ...]:
    acts = importlib.import_module("transformers.activations")
    return tuple(getattr(acts, n) for n in _ACTIVATION_NAMES if hasattr(acts, n))


def is_exact_gelu(act: nn.Module) -> bool:
    """GELU as the post-GELU quantizers assume it (``nn.GELU`` or transformers' ``GELUActivation`` on torch's gelu)."""
    if isinstance(act, nn.GELU):
        return True
    import torch.nn.functional as F
    return type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu


@dataclass(frozen=True)
class HFVitFamily:
    """How one ``transformers`` family names its modules."""

    name: str                    # "ViT"
    module: str                  # transformers.models.vit.modeling_vit
    config: str                  # ViTConfig
    prefix: str                  # class-name prefix: ViT, DeiT, Dinov2
    layers: str                  # the layer list under the backbone
    norms: tuple[str, str]       # the pre-attention and pre-MLP LayerNorms of a layer
    proj: str = "o_proj"         # the attention's output projection
    layer_scales: tuple[str, ...] = ()
    dropouts: tuple[str, ...] = ("dropout",)
    #: model class name -> (the backbone attribute, "" for the backbone itself; the classifier attributes)
    models: dict = field(default_factory=dict)
    #: config keys (besides image_size / num_labels / num_channels) that define the architecture
    config_args: dict = field(default_factory=dict)

    def cls(self, name: str) -> type:
        return hf_class(self.module, name)


_VIT_ARGS = dict(patch_size=SIZE, hidden_size=POSITIVE_INT, num_hidden_layers=POSITIVE_INT,
                 num_attention_heads=POSITIVE_INT, intermediate_size=POSITIVE_INT, qkv_bias=BOOL,
                 layer_norm_eps=POSITIVE_NUMBER, hidden_act=HIDDEN_ACTS, pooler_output_size=POSITIVE_INT,
                 add_pooling_layer=BOOL)

VIT = HFVitFamily("ViT", "transformers.models.vit.modeling_vit", "ViTConfig", "ViT", "layers",
                  ("layernorm_before", "layernorm_after"),
                  models={"ViTForImageClassification": ("vit", ("classifier",)), "ViTModel": ("", ())},
                  config_args=_VIT_ARGS)
DEIT = HFVitFamily("DeiT", "transformers.models.deit.modeling_deit", "DeiTConfig", "DeiT", "layers",
                   ("layernorm_before", "layernorm_after"),
                   models={"DeiTForImageClassification": ("deit", ("classifier",)),
                           "DeiTForImageClassificationWithTeacher": ("deit", ("cls_classifier", "distillation_classifier")),
                           "DeiTModel": ("", ())},
                   config_args=_VIT_ARGS)
DINOV2 = HFVitFamily("DINOv2", "transformers.models.dinov2.modeling_dinov2", "Dinov2Config", "Dinov2", "encoder.layer",
                     ("norm1", "norm2"), layer_scales=("layer_scale1", "layer_scale2"), dropouts=("drop_path",),
                     models={"Dinov2ForImageClassification": ("dinov2", ("classifier",)), "Dinov2Model": ("", ())},
                     config_args=dict(patch_size=SIZE, hidden_size=POSITIVE_INT, num_hidden_layers=POSITIVE_INT,
                                      num_attention_heads=POSITIVE_INT, mlp_ratio=POSITIVE_NUMBER, qkv_bias=BOOL,
                                      layer_norm_eps=POSITIVE_NUMBER, hidden_act=HIDDEN_ACTS, use_swiglu_ffn=BOOL,
                                      drop_path_rate=ArgKind("a number in [0, 1)", lambda v: isinstance(v, (int, float))
                                                             and not isinstance(v, bool) and 0 <= v < 1)))

#: What each classifier model's heads read of its normed last layer output (transformers' forward).
_READOUTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "ViTForImageClassification": lambda h: h[:, 0],
    "DeiTForImageClassification": lambda h: h[:, 0],
    "DeiTForImageClassificationWithTeacher": lambda h: h[:, :2],    # the class and the distillation token
    "Dinov2ForImageClassification": lambda h: torch.cat([h[:, 0], h[:, 1:].mean(dim=1)], dim=1),
}

#: Constructor arguments of a model class (not config keys).
_CONSTRUCTOR_ARGS = ("add_pooling_layer",)


def _size(v) -> "int | list[int]":
    return list(v) if isinstance(v, (tuple, list)) else int(v)


class HFVitAdapter(Adapter):
    """One ``transformers`` family of the ViT layout (:data:`VIT`, :data:`DEIT` or :data:`DINOV2`)."""

    def __init__(self, spec: HFVitFamily):
        self.spec = spec
        self.family = f"Hugging Face {spec.name}"
        self.model_class_names = tuple(f"{spec.module}.{n}" for n in spec.models)
        self.architectures = tuple(spec.models)
        self.create_args = dict(spec.config_args)

    # ---- rebuilding from a checkpoint

    def common_create_kwargs(self, model: nn.Module) -> dict:
        # A transformers model is rebuilt from its config alone: every architecture key is read off at
        # once (a default config is another, much larger model, so there is nothing smaller to try first).
        cfg = model.config
        kw: dict = {"num_classes": int(cfg.num_labels), "img_size": _size(cfg.image_size),
                    "in_chans": int(cfg.num_channels)}
        for key in self.spec.config_args:
            if key in _CONSTRUCTOR_ARGS:
                if hasattr(model, "pooler"):
                    kw[key] = model.pooler is not None
            elif hasattr(cfg, key):
                value = getattr(cfg, key)
                kw[key] = _size(value) if key == "patch_size" else value
        return kw

    def create_model(self, name: str, **kwargs) -> nn.Module:
        """``<ModelClass>(<Config>(**kwargs))``, weights random: the classes are this adapter's own, by name."""
        if name not in self.spec.models:
            raise ValueError(f"{name!r} is not a {self.family} model class")
        ctor = {k: kwargs.pop(k) for k in _CONSTRUCTOR_ARGS if k in kwargs}
        cfg_kw = {"num_labels": kwargs.pop("num_classes", 2), "num_channels": kwargs.pop("in_chans", 3)}
        if "img_size" in kwargs:
            size = kwargs.pop("img_size")
            cfg_kw["image_size"] = list(size) if isinstance(size, tuple) else size
        if isinstance(kwargs.get("patch_size"), tuple):
            kwargs["patch_size"] = list(kwargs["patch_size"])
        config = self.spec.cls(self.spec.config)(**cfg_kw, **kwargs)
        return self.spec.cls(name)(config, **ctor)

    def check_image_size(self, model: nn.Module, height: int, width: int, what: str = "images") -> None:
        cfg = model.config
        size = cfg.image_size if isinstance(cfg.image_size, (tuple, list)) else (cfg.image_size, cfg.image_size)
        patch = cfg.patch_size if isinstance(cfg.patch_size, (tuple, list)) else (cfg.patch_size, cfg.patch_size)
        if self.spec is DINOV2:  # resamples its position embedding for the grid it is given
            if height % patch[0] or width % patch[1]:
                raise _size_error(what, height, width, f"takes sizes that are multiples of its {patch[0]}x{patch[1]} "
                                                       f"patches")
        elif (height, width) != tuple(size):
            raise _size_error(what, height, width, f"takes {size[0]}x{size[1]} images")

    # ---- planning

    def _open_backbone(self, p: SitePlan, model: nn.Module, backbone_attr: str,
                       backbone_class: str) -> tuple[str, nn.Module]:
        """Plan the model itself and its backbone (``model.<backbone_attr>`` of class ``backbone_class``, or
        the model itself); returns the backbone's path prefix and the backbone. Every family of these
        adapters reads its output by name, so a tuple-returning config is refused here."""
        if getattr(model.config, "return_dict", True) is False:
            raise p.refuse("", model, "config.return_dict=False makes the model return a tuple; ptq4vit reads the "
                                      "output by name from its ModelOutput (set return_dict=True)")
        p.container("")
        if not backbone_attr:
            return "", model
        backbone = getattr(model, backbone_attr)
        self._check_class(p, backbone_attr, backbone, backbone_class)
        p.container(backbone_attr)
        return f"{backbone_attr}.", backbone

    def plan(self, model: nn.Module, build: SiteBuilder) -> SitePlan:
        name = type(model).__name__
        backbone_attr, heads = self.spec.models[name]
        p = TensorOutputPlan(self.family, self.output_field(model))
        prefix, backbone = self._open_backbone(p, model, backbone_attr, f"{self.spec.prefix}Model")
        self._plan_embeddings(p, f"{prefix}embeddings", backbone.embeddings, build)
        parts = self.spec.layers.split(".")
        for i in range(len(parts)):
            p.container(prefix + ".".join(parts[:i + 1]))
        layers = backbone.get_submodule(self.spec.layers)
        for i, layer in enumerate(layers):
            self._plan_layer(p, f"{prefix}{self.spec.layers}.{i}", layer, build)
        p.keep_float(f"{prefix}layernorm", backbone.layernorm, NORMS, "norm")
        pooler = getattr(backbone, "pooler", None)
        if pooler is not None:
            self._check_class(p, f"{prefix}pooler", pooler, f"{self.spec.prefix}Pooler")
            p.container(f"{prefix}pooler")
            p.site(f"{prefix}pooler.dense", pooler.dense, nn.Linear, build.normed_linear)
            p.keep_float(f"{prefix}pooler.activation", pooler.activation, (nn.Tanh, *hf_activations()),
                         "pooler activation")
        for head in heads:
            p.classifier(head, getattr(model, head), build)  # Identity with num_labels=0
        return p

    def output_field(self, model: nn.Module) -> str:
        """The ``ModelOutput`` field that is ``model``'s output: the classifiers' logits, a backbone's pooled
        output (``last_hidden_state`` for a ViT/DeiT backbone built without a pooler)."""
        _, heads = self.spec.models[type(model).__name__]
        if heads:
            return "logits"
        return "pooler_output" if self.spec is DINOV2 or getattr(model, "pooler", None) is not None \
            else "last_hidden_state"

    def return_tensor(self, model: nn.Module) -> None:
        """Make the float ``model`` return what its quantized twin returns (:meth:`output_field`), for a harness
        that evaluates both."""
        return_tensor(model, self.output_field(model))

    def _check_class(self, p: SitePlan, path: str, module: nn.Module, expected: str) -> None:
        if type(module) is not self.spec.cls(expected):
            raise p.refuse(path, module, f"expected {self.spec.module}.{expected} here")

    def _plan_embeddings(self, p: SitePlan, path: str, emb: nn.Module, build: SiteBuilder) -> None:
        self._check_class(p, path, emb, f"{self.spec.prefix}Embeddings")
        p.container(path)
        pe = emb.patch_embeddings
        self._check_class(p, f"{path}.patch_embeddings", pe, f"{self.spec.prefix}PatchEmbeddings")
        p.container(f"{path}.patch_embeddings")
        p.site(f"{path}.patch_embeddings.projection", pe.projection, nn.Conv2d, build.patch_conv)
        p.keep_float(f"{path}.dropout", emb.dropout, DROPOUTS, "dropout")

    def _plan_layer(self, p: SitePlan, path: str, layer: nn.Module, build: SiteBuilder) -> None:
        self._check_class(p, path, layer, f"{self.spec.prefix}Layer")
        p.container(path)
        for norm in self.spec.norms:
            p.keep_float(f"{path}.{norm}", getattr(layer, norm), NORMS, "norm")
        self._plan_attention(p, f"{path}.attention", layer.attention, build)
        self._plan_mlp(p, f"{path}.mlp", layer.mlp, build)
        for name in self.spec.layer_scales:  # an Identity once a rotation folded it into the writer
            p.keep_float(f"{path}.{name}", getattr(layer, name),
                         (self.spec.cls(f"{self.spec.prefix}LayerScale"), nn.Identity), "layer scale")
        drop_path = getattr(importlib.import_module(self.spec.module), f"{self.spec.prefix}DropPath", None)
        for name in self.spec.dropouts:
            p.keep_float(f"{path}.{name}", getattr(layer, name), DROPOUTS + ((drop_path,) if drop_path else ()),
                         "dropout")

    def _plan_attention(self, p: SitePlan, path: str, attn: nn.Module, build: SiteBuilder) -> None:
        self._check_class(p, path, attn, f"{self.spec.prefix}Attention")
        for name in ("q_proj", "k_proj", "v_proj", self.spec.proj):
            p.part(f"{path}.{name}", getattr(attn, name), (nn.Linear,), f"the {name} projection")
        if len({attn.q_proj.bias is None, attn.k_proj.bias is None, attn.v_proj.bias is None}) != 1:
            raise p.refuse(path, attn, "q, k and v projections must all have a bias or all have none (they are "
                                       "fused into one qkv site)")
        proj = self.spec.proj
        p.replaced_with_parts(path, lambda a: QuantHFAttention(
            a, build.qkv_linear(fused_qkv(a.q_proj, a.k_proj, a.v_proj)), build.linear(getattr(a, proj)), proj,
            *build.attention_matmuls(a.num_attention_heads, a.q_proj)))

    def _plan_mlp(self, p: SitePlan, path: str, mlp: nn.Module, build: SiteBuilder) -> None:
        swiglu = getattr(importlib.import_module(self.spec.module), f"{self.spec.prefix}SwiGLUFFN", None)
        if swiglu is not None and type(mlp) is swiglu:
            raise p.refuse(path, mlp, "the SwiGLU MLP (use_swiglu_ffn=True) is not supported: its gated product "
                                      "feeds down_proj, which no quantizer here is designed for")
        self._check_class(p, path, mlp, f"{self.spec.prefix}MLP")
        p.container(path)
        p.site(f"{path}.fc1", mlp.fc1, nn.Linear, build.normed_linear)
        act, act_path = mlp.activation_fn, f"{path}.activation_fn"
        if type(act) is nn.Sequential and len(act) == 2 and type(act[1]) is OnlineRotation:
            # rotate_fc2: fc2's input rotated online after the activation (docs/lowbit.md §2)
            p.container(act_path)
            p.keep_float(f"{act_path}.1", act[1], (OnlineRotation,), "online rotation")
            act, act_path = act[0], f"{act_path}.0"
        if build.post_gelu_quantizer and not is_exact_gelu(act):
            raise p.refuse(act_path, act, "the post-GELU quantizers (gelu_twin, gelu_log) need the exact GELU "
                                          "(hidden_act='gelu'); turn them off to quantize fc2's input uniformly")
        p.keep_float(act_path, act, (nn.GELU, nn.SiLU, nn.ReLU, *hf_activations()), "MLP activation")
        p.site(f"{path}.fc2", mlp.fc2, nn.Linear, build.post_gelu_linear)

    def rotation_layout(self, model: nn.Module, residual: bool) -> RotationLayout:
        return hf_vit_rotation_layout(self.spec, model, residual)

    def _layers(self, model: nn.Module) -> str:
        """The path of ``model``'s layer list (under its backbone)."""
        backbone_attr, _ = self.spec.models[type(model).__name__]
        return f"{backbone_attr}.{self.spec.layers}" if backbone_attr else self.spec.layers

    def blocks(self, model: nn.Module) -> list[str]:
        """The family's layers (``vit.encoder.layer.i`` for a ``ViTForImageClassification``)."""
        return child_paths(model, self._layers(model))

    def head_features(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The backbone's final ``layernorm``, then the token(s) the classifiers read (:data:`_READOUTS`);
        backbones (their pooler or every token are outputs), CLIP and SigLIP refuse."""
        name = type(model).__name__
        readout = _READOUTS.get(name)
        if readout is None:
            return super().head_features(model)
        backbone_attr, _ = self.spec.models[name]
        norm = getattr(model, backbone_attr).layernorm
        return lambda x: readout(norm(x))

    def norm_linear_pairs(self, model: nn.Module) -> list[tuple[str, str]]:
        """Each layer's first norm feeds only q/k/v (the fused ``qkv`` site), its second only fc1."""
        layers_path = self._layers(model)
        pairs = []
        for i, layer in enumerate(model.get_submodule(layers_path)):
            path = f"{layers_path}.{i}"
            for norm, linear in zip(self.spec.norms, ("attention.qkv", "mlp.fc1")):
                check_affine_norm(f"{path}.{norm}", getattr(layer, norm), self.family)
                pairs.append((f"{path}.{norm}", f"{path}.{linear}"))
        return pairs


def _size_error(what: str, height: int, width: int, takes: str):
    from ..errors import UserError
    return UserError(f"{what} are {height}x{width} but the model {takes}")

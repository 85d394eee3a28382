"""What an adapter is: a complete account of one model family's modules.

An adapter walks a model of its family and states, for every module, one of:

* a **site**: replaced by its quantized counterpart (a factory that builds it from the float one);
* **float**: a module (and everything in it) that may stay float: norms, dropouts, layer scales,
  pooling; a Linear or Conv is never one;
* a **container**: a module whose children the adapter accounts for one by one;
* a **part**: a child that a replaced module takes over (qkv/proj of an attention module).

:meth:`SitePlan.check_complete` then refuses any module the adapter did not account for, naming
it, so nothing unknown is left silently in float. Planning does not touch the model: a refused
model is left as it was.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import nn
from timm.layers import ClassifierHead, DropPath, Mlp, PatchDropout, PatchEmbed, SelectAdaptivePool2d
# Imported from vision_transformer (not timm.layers, which gained it after 1.0.3, the floor)
from timm.models.vision_transformer import Attention
from torchvision.ops.stochastic_depth import StochasticDepth

from ..errors import UnsupportedModelError, UserError
from ..transforms.modules import OnlineRotation, RMSNorm
from ..transforms.rotation_layout import RotationLayout
from .attention import QuantAttention
from .create_args import ArgKind
from .sites import SiteBuilder

#: Float modules allowed where a norm goes (elementwise over features). RMSNorm is what a
#: LayerNorm becomes when a rotation folds its centring and affine away (docs/lowbit.md §2).
NORMS = (nn.LayerNorm, RMSNorm, nn.Identity)
#: Float modules allowed where a dropout or stochastic depth goes (identity at inference).
DROPOUTS = (nn.Dropout, DropPath, PatchDropout, nn.Identity)
#: Modules that compute the identity in eval mode (a checkpoint's architecture comparison skips their settings).
EVAL_IDENTITIES = (nn.Dropout, DropPath, StochasticDepth, nn.Identity)
#: MLP activations allowed when the post-GELU twin is off (the twin needs nn.GELU).
ACTIVATIONS = (nn.GELU, nn.SiLU, nn.ReLU, nn.Identity)

#: Makes the quantized module from the float module it replaces.
SiteFactory = Callable[[nn.Module], nn.Module]


def _stray_layer(path: str, module: nn.Module) -> tuple[str, nn.Module] | None:
    """The first Linear or Conv inside ``module`` (itself included), if any."""
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return (f"{path}.{name}" if name else path), m
    return None


class SitePlan:
    """The adapter's account of a model: sites to replace and what may stay float."""

    def __init__(self, family: str):
        self.family = family
        self.replacements: dict[str, SiteFactory] = {}
        self.float_subtrees: set[str] = set()
        self.containers: set[str] = set()
        self.parts: set[str] = set()

    # ---- refusals

    def refuse(self, path: str, module: nn.Module, why: str) -> UnsupportedModelError:
        """The error for an unsupported module (raise it): names the module, its type and why."""
        return UnsupportedModelError(f"module {path or '<model>'!r} of type {type(module).__name__} is not supported "
                                     f"by the {self.family} adapter: {why}")

    # ---- what the adapter states

    def container(self, path: str) -> None:
        self.containers.add(path)

    def site(self, path: str, module: nn.Module, expected: type[nn.Module], factory: SiteFactory) -> None:
        """``module`` (exactly of class ``expected``) becomes a quantization site built by ``factory``."""
        if type(module) is not expected:
            raise self.refuse(path, module, f"expected a {expected.__name__} quantization site here")
        self.replacements[path] = factory

    def replaced_with_parts(self, path: str, factory: SiteFactory) -> None:
        """``path`` is replaced as a whole; its children must be declared with :meth:`part`."""
        self.replacements[path] = factory

    def part(self, path: str, module: nn.Module, allowed: tuple[type[nn.Module], ...], role: str) -> None:
        """A child taken over by a replaced module: an instance of ``allowed`` (a Linear: exactly nn.Linear)."""
        ok = type(module) is nn.Linear if nn.Linear in allowed else isinstance(module, allowed)
        if not ok:
            raise self.refuse(path, module, f"{role} must be {' or '.join(c.__name__ for c in allowed)}")
        self.parts.add(path)

    def keep_float(self, path: str, module: nn.Module, allowed: tuple[type[nn.Module], ...], role: str) -> None:
        """``module`` may stay float: an instance of one of ``allowed`` with no Linear/Conv anywhere inside."""
        stray = _stray_layer(path, module)
        if stray is not None:
            raise self.refuse(stray[0], stray[1], f"a stray {type(stray[1]).__name__} where a {role} goes is not a "
                                                  f"quantization site this adapter knows (it would stay float)")
        if not isinstance(module, allowed):
            raise self.refuse(path, module, f"a {role} must be one of {', '.join(c.__name__ for c in allowed)}")
        self.float_subtrees.add(path)

    def patch_embed(self, path: str, pe: nn.Module, build: SiteBuilder,
                    norms: tuple[type[nn.Module], ...] = NORMS) -> None:
        """timm's ``PatchEmbed``: one conv (a site; its image input stays float) and an optional norm,
        one of ``norms``."""
        if type(pe) is not PatchEmbed:
            raise self.refuse(path, pe, "only timm's PatchEmbed (one conv) is a known patch embedding")
        self.container(path)
        self.site(f"{path}.proj", pe.proj, nn.Conv2d, build.patch_conv)
        self.keep_float(f"{path}.norm", pe.norm, norms, "norm")

    def classifier(self, path: str, head: nn.Module, build: SiteBuilder) -> None:
        """The classifier Linear (a site), or the Identity that ``num_classes=0`` leaves (features only)."""
        if isinstance(head, nn.Identity):
            self.keep_float(path, head, (nn.Identity,), "classifier")
        else:
            self.site(path, head, nn.Linear, build.classifier)

    def classifier_head(self, path: str, head: nn.Module, build: SiteBuilder) -> None:
        """timm's ``ClassifierHead``: pooling and dropout stay float, ``fc`` is the classifier."""
        if type(head) is not ClassifierHead:
            raise self.refuse(path, head, "only timm's ClassifierHead (pool, dropout, fc) is a known classifier layout")
        self.container(path)
        self.keep_float(f"{path}.global_pool", head.global_pool, (SelectAdaptivePool2d,), "pooling")
        self.keep_float(f"{path}.drop", head.drop, DROPOUTS, "dropout")
        self.classifier(f"{path}.fc", head.fc, build)
        self.keep_float(f"{path}.flatten", head.flatten, (nn.Identity, nn.Flatten), "flatten")

    def mlp(self, path: str, mlp: nn.Module, build: SiteBuilder) -> None:
        """timm's ``Mlp``: fc1 → act → fc2, with fc2's input quantized as a GELU output."""
        if type(mlp) is not Mlp:
            raise self.refuse(path, mlp, "only timm's Mlp (fc1, activation, fc2) is a known MLP layout")
        self.container(path)
        self.site(f"{path}.fc1", mlp.fc1, nn.Linear, build.normed_linear)
        if build.recipe.gelu.variant == "twin" and not isinstance(mlp.act, nn.GELU):
            raise self.refuse(f"{path}.act", mlp.act, "the post-GELU twin quantizer (docs/method.md §4) needs nn.GELU; "
                                                      "turn gelu_twin off to quantize fc2's input uniformly")
        if build.recipe.gelu.variant == "log" and not isinstance(mlp.act, nn.GELU):
            raise self.refuse(f"{path}.act", mlp.act, "the post-GELU log quantizer (docs/lowbit.md §8) needs nn.GELU; "
                                                      "set gelu_log='none' to quantize fc2's input uniformly")
        self.keep_float(f"{path}.act", mlp.act, ACTIVATIONS, "MLP activation")
        self.keep_float(f"{path}.drop1", mlp.drop1, DROPOUTS, "dropout")
        norm = getattr(mlp, "norm", None)
        if isinstance(norm, OnlineRotation):  # fc2's input rotated online (docs/lowbit.md §2): float, any preset
            self.keep_float(f"{path}.norm", norm, (OnlineRotation,), "online rotation")
        elif norm is not None:
            if type(norm) is not nn.Identity:
                raise self.refuse(f"{path}.norm", norm,
                                  "a norm between the activation and fc2 (scale_mlp_norm=True) is not supported: fc2's "
                                  "input is then not the activation output that its quantizer is designed for")
            self.keep_float(f"{path}.norm", norm, (nn.Identity,), "MLP norm")
        self.site(f"{path}.fc2", mlp.fc2, nn.Linear, build.post_gelu_linear)
        self.keep_float(f"{path}.drop2", mlp.drop2, DROPOUTS, "dropout")

    def refuse_qk_norm_and_gate(self, path: str, attn: nn.Module) -> None:
        """Refuse q/k normalisation (``q_norm``/``k_norm`` not Identity) and a ``gate`` in a timm attention module."""
        for name in ("q_norm", "k_norm"):
            if type(getattr(attn, name)) is not nn.Identity:
                raise self.refuse(f"{path}.{name}", getattr(attn, name),
                                  "q/k normalisation (qk_norm=True) is not supported: the attention matmul operands "
                                  "would be the normalised q and k, which calibration and export do not model")
        if getattr(attn, "gate", None) is not None:
            raise self.refuse(f"{path}.gate", attn.gate, "gated attention is not supported")

    def pre_norm_block(self, path: str, block: nn.Module, attention: Callable[[str, nn.Module], None],
                       mlp: Callable[[str, nn.Module], None]) -> None:
        """A pre-norm block ``x + drop_path1(attn(norm1(x)))``, ``x + drop_path2(mlp(norm2(x)))`` (any
        LayerScale being parameters of the block): norms and stochastic depth stay float, ``attention``
        and ``mlp`` plan the two branches (each called with the child's path and module)."""
        self.container(path)
        self.keep_float(f"{path}.norm1", block.norm1, NORMS, "norm")
        attention(f"{path}.attn", block.attn)
        self.keep_float(f"{path}.norm2", block.norm2, NORMS, "norm")
        mlp(f"{path}.mlp", block.mlp)
        for name in ("drop_path1", "drop_path2"):
            self.keep_float(f"{path}.{name}", getattr(block, name), DROPOUTS, "stochastic depth")

    def attention(self, path: str, attn: nn.Module, build: SiteBuilder) -> None:
        """timm's ``Attention``: replaced by :class:`QuantAttention` (qkv, proj and the two matmuls as sites);
        q/k normalisation and gating are refused."""
        if type(attn) is not Attention:
            raise self.refuse(path, attn, "only timm's Attention (fused qkv, softmax attention, proj) is a known "
                                          "attention layout; its matmuls would otherwise stay float")
        self.refuse_qk_norm_and_gate(path, attn)
        self.replaced_with_parts(path, lambda a: QuantAttention(a, build.qkv_linear(a.qkv), build.linear(a.proj),
                                                               *build.attention_matmuls(a.num_heads, a.qkv)))
        self.part(f"{path}.qkv", attn.qkv, (nn.Linear,), "the qkv projection")
        self.part(f"{path}.proj", attn.proj, (nn.Linear,), "the output projection")
        self.part(f"{path}.q_norm", attn.q_norm, (nn.Identity,), "q norm")
        self.part(f"{path}.k_norm", attn.k_norm, (nn.Identity,), "k norm")
        if getattr(attn, "norm", None) is not None:
            self.part(f"{path}.norm", attn.norm, (nn.Identity, nn.LayerNorm), "the attention output norm")
        self.part(f"{path}.attn_drop", attn.attn_drop, (nn.Dropout,), "attention dropout")
        self.part(f"{path}.proj_drop", attn.proj_drop, (nn.Dropout,), "projection dropout")

    # ---- checking and applying

    def _accounted(self, name: str) -> bool:
        # A replaced module's children are accounted only as declared parts.
        if name in self.containers or name in self.replacements:
            return True
        while name:
            if name in self.float_subtrees or name in self.parts:
                return True
            name = name.rpartition(".")[0]
        return False

    def check_complete(self, model: nn.Module) -> None:
        """Refuse the first module (in model order) that the adapter did not account for."""
        for name, module in model.named_modules():
            if self._accounted(name):
                continue
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                raise self.refuse(name, module, f"a stray {type(module).__name__} is not a quantization site this "
                                                "adapter knows (it would stay float)")
            raise self.refuse(name, module, "not a part of the model layout this adapter knows")

    def apply(self, model: nn.Module) -> None:
        """Replace every site in ``model`` (sites never nest, so the order does not matter)."""
        for path, factory in self.replacements.items():
            parent, _, child = path.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, child, factory(getattr(owner, child)))


class Adapter(ABC):
    """Knows one model family: which classes it takes and how to plan their quantization."""

    #: Human-readable family name used in error messages.
    family: str = ""
    #: The exact model classes this adapter handles (subclasses are not assumed to be alike).
    model_classes: tuple[type[nn.Module], ...] = ()
    #: Exact model classes named ``"module.QualName"``, for a family from an optional package: matched
    #: without importing that package (a model of one of them means the package is already imported).
    model_class_names: tuple[str, ...] = ()
    #: The timm modules (``timm.models.<name>``) whose registered model names build those classes: a
    #: checkpoint naming a model of any other module is refused before timm builds anything.
    timm_modules: tuple[str, ...] = ()
    #: The ``timm.create_model`` arguments that rebuild this family's architecture besides
    #: ``COMMON_CREATE_ARGS``, with the values each takes; a checkpoint passes nothing else to timm.
    create_args: dict[str, ArgKind] = {}
    #: Model names this adapter builds itself with :meth:`create_model` (a family from outside timm's
    #: registry); a checkpoint of one of them is rebuilt through this adapter.
    architectures: tuple[str, ...] = ()

    @abstractmethod
    def plan(self, model: nn.Module, build: SiteBuilder) -> SitePlan:
        """Account for every module of ``model``; raise UnsupportedModelError on anything unknown."""

    def model_name(self, model: nn.Module) -> str:
        """The name a checkpoint of ``model`` records, which :meth:`create_model` rebuilds it from:
        ``architecture.tag`` from timm's pretrained config (the class name without one)."""
        from ..quantized import model_name

        return model_name(model)

    def create_kwargs(self, model: nn.Module) -> dict:
        """This family's ``create_args`` as read off ``model`` (plain JSON values), for a checkpoint to rebuild it."""
        return {}

    def check_image_size(self, model: nn.Module, height: int, width: int, what: str = "images") -> None:
        """Refuse images of a size the model does not take, naming both sizes. Default: the family
        embeds the image with timm's ``PatchEmbed`` at ``model.patch_embed``, whose settings say
        which sizes it takes."""
        check_patch_embed_size(model.patch_embed, height, width, what)

    def common_create_kwargs(self, model: nn.Module) -> dict:
        """The ``COMMON_CREATE_ARGS`` as read off ``model``: what a checkpoint tries first. timm's models
        keep ``num_classes`` and a ``patch_embed`` with ``img_size`` and a ``proj`` conv."""
        kw: dict = {"num_classes": model.num_classes}
        pe = getattr(model, "patch_embed", None)
        if pe is not None and getattr(pe, "img_size", None) is not None:
            kw["img_size"] = list(pe.img_size)
            kw["in_chans"] = pe.proj.in_channels
        return kw

    def create_model(self, name: str, **kwargs) -> nn.Module:
        """A float model ``name`` built with the architecture arguments ``kwargs``, weights random (a
        checkpoint's tensors replace them): ``timm.create_model(name, pretrained=False, **kwargs)``."""
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    def norm_linear_pairs(self, model: nn.Module) -> list[tuple[str, str]]:
        """``(LayerNorm, linear layer)`` paths where the norm's output feeds that one linear layer only,
        for RepQ-ViT's reparameterization (``reparam_ln``, docs/lowbit.md §6). Families that do not
        list them refuse it."""
        raise UnsupportedModelError(f"reparam_ln (RepQ-ViT's LayerNorm reparameterization) is not supported for "
                                    f"{type(model).__name__} by the {self.family} adapter")

    def blocks(self, model: nn.Module) -> list[str]:
        """The paths of ``model``'s transformer blocks in model order, reconstruction's units (docs/lowbit.md
        §11): each called with its tokens (and arguments the model passes the same for every image) and
        returning its tokens. Families that do not state them refuse reconstruction."""
        raise UnsupportedModelError(f"reconstruction is not supported for {type(model).__name__} by the "
                                    f"{self.family} adapter: it does not state the model's blocks (use "
                                    f"reconstruction='none')")

    def head_features(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The features the classifier reads of the output of ``model``'s last block, as a function of that
        output made of float modules only (the final norm and the pooling), for reconstruction's
        ``last_unit="features"`` (docs/lowbit.md §11). Families that do not state it refuse it."""
        raise UnsupportedModelError(f"reconstruction.last_unit='features' is not supported for {type(model).__name__} "
                                    f"by the {self.family} adapter: it does not state what the classifier reads of "
                                    f"the last block's output (use last_unit='output')")

    def rotation_layout(self, model: nn.Module, residual: bool) -> RotationLayout:
        """Where the rotations of docs/lowbit.md §2 fold in ``model`` (the residual stream's writers,
        readers, norms and layer scales only with ``residual``), after checking that the model has the
        layout they assume; UnsupportedModelError naming the module otherwise. Families that do not
        describe it refuse every rotation."""
        raise UnsupportedModelError(f"rotation (rotate_residual, rotate_heads, rotate_fc2) is not supported for "
                                    f"{type(model).__name__} by the {self.family} adapter")


def child_paths(model: nn.Module, container: str) -> list[str]:
    """The paths of the children of ``model``'s submodule ``container``, in order."""
    return [f"{container}.{name}" for name, _ in model.get_submodule(container).named_children()]


def timm_pooled_features(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the classifier of a timm model reads of its last block's output, by timm's convention: the
    final ``norm`` ends ``forward_features`` and ``forward_head(..., pre_logits=True)`` pools (the class
    token, or the mean of the patch tokens, and ``fc_norm``; Swin's average over the grid). Refuses an
    attention pool (its sites belong to no unit) and no pooling (every token is an output)."""
    name = type(model).__name__
    if getattr(model, "attn_pool", None) is not None:
        raise UnsupportedModelError(f"reconstruction.last_unit='features' is not supported for a {name} with "
                                    f"global_pool='map': its attention pool holds quantization sites that no "
                                    f"unit learns (use last_unit='output')")
    if not model.global_pool:
        raise UnsupportedModelError(f"reconstruction.last_unit='features' is not supported for a {name} with "
                                    f"global_pool='': it outputs every token (use last_unit='output')")
    return lambda x: model.forward_head(model.norm(x), pre_logits=True)


def check_affine_norm(path: str, norm: nn.Module, family: str) -> None:
    """Refuse a norm that has no per-channel affine for a reparameterization to fold into."""
    if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
        raise UnsupportedModelError(f"module {path!r} of type {type(norm).__name__} cannot take reparam_ln in the "
                                    f"{family} adapter: it needs a LayerNorm with a weight and a bias")


def check_patch_embed_size(pe: nn.Module, height: int, width: int, what: str = "images") -> None:
    """UserError naming both sizes unless timm's ``PatchEmbed`` ``pe`` takes ``height x width`` images.

    A strict one (a model built for one size) takes its ``img_size`` only. A model built with
    ``dynamic_img_size=True`` has a non-strict one, which takes multiples of the patch size (any
    size with ``dynamic_img_pad=True``, which pads); the model resamples its position embedding
    (ViT) or builds its attention masks (Swin) for the size it is given.
    """
    if pe.img_size is None:  # built without a size: every size that the convolution takes
        return
    size, patch = tuple(pe.img_size), tuple(pe.patch_size)
    if pe.strict_img_size:
        if (height, width) != size:
            raise UserError(f"{what} are {height}x{width} but the model takes {size[0]}x{size[1]} images (build it "
                            f"with dynamic_img_size=True to take other sizes)")
    elif not pe.dynamic_img_pad and (height % patch[0] or width % patch[1]):
        raise UserError(f"{what} are {height}x{width} but the model (built for {size[0]}x{size[1]}, dynamic_img_size) "
                        f"takes sizes that are multiples of its {patch[0]}x{patch[1]} patches")

"""The encoder layer that Hugging Face ``transformers``' CLIP and SigLIP vision towers share
(``layer_norm1``, ``self_attn`` with separate q/k/v projections and ``out_proj``, ``layer_norm2``,
an MLP ``fc1`` → activation → ``fc2``), planned as quantization sites, and which activations the
post-GELU quantizers take.

The post-GELU quantizers (the twin, docs/method.md §4, and the log quantizer, docs/lowbit.md §8)
code negative inputs on a fixed grid over GELU's negative range ``[-GELU_NEG_RANGE, 0]``: valid for
an activation whose minimum that grid reaches (rounded, the codes never clip). CLIP's QuickGELU
``x·σ(1.702x)`` has its minimum at -0.1636, inside that range; the tanh approximations of GELU
(SigLIP's ``gelu_pytorch_tanh``) at -0.17004, 7e-5 below it, which is under half a step at every
allowed bit width (at 8 bits the step is 0.17/128), so it rounds onto the last code. SiLU (-0.278)
and unknown activations are refused with the twin on.
"""
from __future__ import annotations

import importlib

from torch import nn

from ..quant.twin import GELU_NEG_RANGE
from ..quant.uniform import MAX_BITS, qmax
from ..transforms.modules import OnlineRotation
from .adapter import NORMS, SitePlan
from .hf_attention import QuantHFAttention, fused_qkv
from .hf_vit import hf_activations, is_exact_gelu
from .sites import SiteBuilder

#: The minimum over the reals of transformers' GELU-like activations, by class (tests/test_families_hf_clip.py
#: checks each on a dense grid).
ACTIVATION_MINIMA = {"QuickGELUActivation": -0.16361019, "PytorchGELUTanh": -0.17004075,
                     "GELUTanh": -0.17004075, "NewGELUActivation": -0.17004075}
#: The lowest value the post-GELU quantizers' negative grid rounds onto its last code at the widest bit width.
POST_GELU_FLOOR = -GELU_NEG_RANGE * (1 + 0.5 / qmax(MAX_BITS))


def fits_post_gelu_quantizers(act: nn.Module) -> bool:
    """Whether the post-GELU quantizers' fixed negative grid covers ``act``'s outputs (see the module doc)."""
    if is_exact_gelu(act):
        return True
    minimum = ACTIVATION_MINIMA.get(type(act).__name__)
    return minimum is not None and minimum >= POST_GELU_FLOOR


def plan_encoder_layer(p: SitePlan, path: str, layer: nn.Module, build: SiteBuilder, module: str, prefix: str) -> None:
    """A ``<prefix>EncoderLayer`` of the ``transformers`` module ``module``: norms float, the attention
    replaced (q/k/v fused into one ``qkv`` site, ``out_proj``, the two matmuls), fc1 and fc2 sites."""
    classes = importlib.import_module(module)
    for child, cls in (("", "EncoderLayer"), ("self_attn", "Attention"), ("mlp", "MLP")):
        m = layer.get_submodule(child) if child else layer
        if type(m) is not getattr(classes, f"{prefix}{cls}"):
            raise p.refuse(f"{path}.{child}" if child else path, m, f"expected {module}.{prefix}{cls} here")
    p.container(path)
    p.keep_float(f"{path}.layer_norm1", layer.layer_norm1, NORMS, "norm")
    p.keep_float(f"{path}.layer_norm2", layer.layer_norm2, NORMS, "norm")
    plan_hf_attention(p, f"{path}.self_attn", layer.self_attn, build)
    plan_hf_mlp(p, f"{path}.mlp", layer.mlp, build)


def plan_hf_attention(p: SitePlan, path: str, attn: nn.Module, build: SiteBuilder) -> None:
    """q/k/v (fused into one ``qkv`` site), ``out_proj`` and the two matmuls of a CLIP-style attention."""
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        p.part(f"{path}.{name}", getattr(attn, name), (nn.Linear,), f"the {name} projection")
    if len({attn.q_proj.bias is None, attn.k_proj.bias is None, attn.v_proj.bias is None}) != 1:
        raise p.refuse(path, attn, "q, k and v projections must all have a bias or all have none (they are fused "
                                   "into one qkv site)")
    p.replaced_with_parts(path, lambda a: QuantHFAttention(
        a, build.qkv_linear(fused_qkv(a.q_proj, a.k_proj, a.v_proj)), build.linear(a.out_proj), "out_proj",
        *build.attention_matmuls(a.num_heads, a.q_proj)))


def plan_hf_mlp(p: SitePlan, path: str, mlp: nn.Module, build: SiteBuilder) -> None:
    """``fc1`` → activation → ``fc2``, fc2's input quantized as a GELU output."""
    p.container(path)
    p.site(f"{path}.fc1", mlp.fc1, nn.Linear, build.normed_linear)
    act, act_path = mlp.activation_fn, f"{path}.activation_fn"
    if type(act) is nn.Sequential and len(act) == 2 and type(act[1]) is OnlineRotation:
        # rotate_fc2: fc2's input rotated online after the activation (docs/lowbit.md §2)
        p.container(act_path)
        p.keep_float(f"{act_path}.1", act[1], (OnlineRotation,), "online rotation")
        act, act_path = act[0], f"{act_path}.0"
    if build.post_gelu_quantizer and not fits_post_gelu_quantizers(act):
        raise p.refuse(act_path, act, "the post-GELU quantizers (gelu_twin, gelu_log) need an activation whose "
                                      "minimum lies in GELU's negative range (GELU, its tanh approximation, "
                                      "QuickGELU); turn them off to quantize fc2's input uniformly")
    p.keep_float(act_path, act, (nn.GELU, nn.SiLU, nn.ReLU, *hf_activations()), "MLP activation")
    p.site(f"{path}.fc2", mlp.fc2, nn.Linear, build.post_gelu_linear)

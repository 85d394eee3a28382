"""Gated MLPs (timm's ``SwiGLU`` and packed ``GluMlp``) as quantization sites.

``fc2``'s input is the gated product ``act(gate) * x`` (or its sub-LayerNorm, ``scale_mlp=True``),
not a GELU output: it gets the uniform input quantizer whatever the preset's post-GELU settings
(``gelu_twin``, ``gelu_log``). Its smoothing divisor, where the preset calibrates one, folds at run
time into the sub-LayerNorm's affine or, without one, into the rows of the ungated half of fc1.
"""
from __future__ import annotations

from torch import nn
from timm.layers import GluMlp, Mlp, SwiGLU

from ..transforms.modules import OnlineRotation
from .adapter import DROPOUTS, NORMS, SitePlan
from .sites import SiteBuilder

#: The gate activations the float model may keep (SwiGLU's SiLU; GLU's sigmoid; GEGLU's GELU).
GATE_ACTIVATIONS = (nn.SiLU, nn.Sigmoid, nn.GELU)


def plan_glu_mlp(p: SitePlan, path: str, mlp: nn.Module, build: SiteBuilder) -> None:
    """timm's ``SwiGLU`` (fc1_g, fc1_x) or ``GluMlp`` (one packed fc1), each with an optional norm
    between the gated product and fc2."""
    if type(mlp) is SwiGLU:
        p.container(path)
        p.site(f"{path}.fc1_g", mlp.fc1_g, nn.Linear, build.normed_linear)
        p.site(f"{path}.fc1_x", mlp.fc1_x, nn.Linear, build.normed_linear)
    elif type(mlp) is GluMlp:
        if isinstance(mlp.fc1, nn.Conv2d):
            raise p.refuse(f"{path}.fc1", mlp.fc1, "a convolutional GluMlp (use_conv=True) is not supported")
        p.container(path)
        p.site(f"{path}.fc1", mlp.fc1, nn.Linear, build.normed_linear)
    else:
        raise p.refuse(path, mlp, "only timm's SwiGLU or GluMlp is a known gated MLP layout")
    p.keep_float(f"{path}.act", mlp.act, GATE_ACTIVATIONS, "gate activation")
    p.keep_float(f"{path}.drop1", mlp.drop1, DROPOUTS, "dropout")
    norm, norm_path = mlp.norm, f"{path}.norm"
    if type(norm) is nn.Sequential and len(norm) == 2 and type(norm[1]) is OnlineRotation:
        # rotate_fc2 after a sub-LayerNorm: fc2's input rotated online after it (docs/lowbit.md §2)
        p.container(norm_path)
        p.keep_float(f"{norm_path}.1", norm[1], (OnlineRotation,), "online rotation")
        norm, norm_path = norm[0], f"{norm_path}.0"
    p.keep_float(norm_path, norm, (*NORMS, OnlineRotation), "sub-LayerNorm (or fc2's online rotation)")
    p.site(f"{path}.fc2", mlp.fc2, nn.Linear, lambda fc2: build.linear(fc2, smooth=True, asymmetric=True))
    p.keep_float(f"{path}.drop2", mlp.drop2, DROPOUTS, "dropout")


def plan_mlp_or_glu(p: SitePlan, path: str, mlp: nn.Module, build: SiteBuilder) -> None:
    """timm's ``Mlp`` (:meth:`SitePlan.mlp`) or a gated MLP (:func:`plan_glu_mlp`), whichever ``mlp`` is."""
    if type(mlp) is Mlp:
        p.mlp(path, mlp, build)
    else:
        plan_glu_mlp(p, path, mlp, build)

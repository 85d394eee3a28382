"""Rotations leave the float function unchanged and spread channel outliers."""
import copy

import pytest
import timm
import torch

import ptq4vit
from ptq4vit.errors import UnsupportedModelError, UserError
from ptq4vit.presets import get_preset
from ptq4vit.transforms import (OnlineRotation, RMSNorm, RotationOptions, apply_rotation, hadamard, make_rotation,
                                random_orthogonal)

from conftest import make_tiny

ALL = RotationOptions(residual=True, heads=True, fc2=True)


def _tiny_dinov2(dtype=torch.float32):
    """A tiny DINOv2-style ViT: LayerScale, two register tokens, non-trivial LayerNorm affine and biases."""
    torch.manual_seed(0)
    m = timm.create_model("vit_small_patch14_dinov2", img_size=28, num_classes=10, pretrained=False, depth=2,
                          embed_dim=96, num_heads=3, reg_tokens=2, init_values=0.3).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if any(k in name for k in ("norm", "gamma", "bias", "token", "pos_embed")):
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    x = torch.randn(4, 3, 28, 28, generator=gen)
    return m.to(dtype), x.to(dtype)


def test_hadamard_and_rotations_are_orthogonal():
    h = hadamard(8)
    assert torch.equal(h @ h.t(), 8 * torch.eye(8, dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    for n, kind in ((384, "hadamard"), (64, "hadamard"), (10, "hadamard"), (12, "orthogonal")):
        r = make_rotation(n, kind, gen).dense()
        assert torch.allclose(r @ r.t(), torch.eye(n, dtype=torch.float64), atol=1e-13, rtol=0)
    # a power of two is a pure randomized Hadamard: every entry ±1/√n
    r = make_rotation(64, "hadamard", gen).dense()
    assert torch.allclose(r.abs(), torch.full((64, 64), 0.125, dtype=torch.float64), atol=1e-15, rtol=0)
    q = random_orthogonal(5, torch.Generator().manual_seed(3))
    assert torch.equal(q, random_orthogonal(5, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("opts", [RotationOptions(residual=True), RotationOptions(heads=True),
                                  RotationOptions(fc2=True), ALL, RotationOptions(True, True, True, "orthogonal", 5)],
                         ids=["residual", "heads", "fc2", "all", "all-orthogonal"])
def test_rotated_model_reproduces_float_model(opts):
    m, x = _tiny_dinov2(torch.float64)
    ref = m(x)
    rot = apply_rotation(copy.deepcopy(m), opts)
    # float64: measured max |diff| 1.6e-15 with |logits| ~1
    assert (rot(x) - ref).abs().max() < 1e-14
    m32, x32 = _tiny_dinov2(torch.float32)
    ref32 = m32(x32)
    # float32: measured 2.4e-7 .. 4.2e-7
    assert (apply_rotation(copy.deepcopy(m32), opts)(x32) - ref32).abs().max() < 2e-6


def test_residual_rotation_replaces_norms_and_layerscale():
    m, _ = _tiny_dinov2()
    apply_rotation(m, ALL)
    assert isinstance(m.blocks[0].norm1, RMSNorm) and isinstance(m.norm, RMSNorm)
    assert isinstance(m.blocks[1].ls2, torch.nn.Identity)
    assert isinstance(m.blocks[0].mlp.norm, OnlineRotation)


def test_distilled_deit_rotates_too():
    m, x = make_tiny("deit_distilled")
    m = m.double()
    x = x.double()
    ref = m(x)
    out = apply_rotation(copy.deepcopy(m), ALL)(x)
    assert (out - ref).abs().max() < 1e-13


def test_residual_rotation_spreads_a_channel_outlier():
    m, x = _tiny_dinov2()
    with torch.no_grad():
        m.blocks[0].norm1.weight[7] = 60.0   # one channel of qkv's input far above the others
    seen = {}

    def grab(mod):
        return mod.register_forward_hook(lambda _, inp, __: seen.__setitem__(id(mod), inp[0]))

    @torch.no_grad()
    def peak_over_rms(model):
        h = grab(model.blocks[0].attn.qkv)
        model(x)
        h.remove()
        t = seen[id(model.blocks[0].attn.qkv)]
        return float(t.abs().amax() / t.square().mean().sqrt())

    before = peak_over_rms(m)
    after = peak_over_rms(apply_rotation(copy.deepcopy(m), RotationOptions(residual=True)))
    assert before > 5.0 and after < before / 2


def test_rotation_after_quantization_sites_with_quantization_off():
    m, x = _tiny_dinov2()
    ref = m(x)
    q = ptq4vit.quantize(m, x, "rotq", 4, 4, progress=False, n_candidates=4, rounds=1, weight_rounding="nearest",
                         w_granularity="block", bias_correction=False)  # (corrected biases change the float model)
    with q.quantization_disabled():
        assert (q(x) - ref).abs().max() < 2e-6
    assert torch.isfinite(q(x)).all()


def test_rotation_options_errors():
    with pytest.raises(UserError, match="gelu_twin=False"):
        get_preset("ptq4vit", rotate_fc2=True)
    with pytest.raises(UserError, match="rotation_kind"):
        get_preset("ptq4vit", rotation_kind="givens")
    swin, _ = make_tiny("swin")
    # a family whose adapter describes no rotation layout is refused by name, before anything changes
    with pytest.raises(UnsupportedModelError, match=r"^rotation \(rotate_residual, rotate_heads, rotate_fc2\) is not "
                                                    r"supported for SwinTransformer by the timm SwinTransformer adapter$"):
        apply_rotation(swin, RotationOptions(heads=True))
    untouched, _ = make_tiny("swin")
    assert apply_rotation(untouched, RotationOptions()) is untouched

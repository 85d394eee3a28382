"""Rotations leave the float function unchanged and spread channel outliers."""
import copy
import re

import pytest
import timm
import torch

import ptq4vit
from ptq4vit import DEFAULT_ADAPTERS, Adapter, SitePlan
from ptq4vit.errors import UserError
from ptq4vit.presets import get_preset
from ptq4vit.transforms import (OnlineRotation, RMSNorm, RotationOptions, apply_rotation, hadamard, make_rotation,
                                random_orthogonal)

from _family_checks import (assert_checkpoint_round_trip, assert_refused_untouched, calibrate_at_w8a8_and_w4a4, max_abs,
                            move_off_init, rotation_error, rotq_switched_off, run_on_onnx_runtime)
from conftest import make_tiny

ALL = RotationOptions(residual=True, heads=True, fc2=True)


def _tiny_dinov2(dtype=torch.float32):
    """A tiny DINOv2-style ViT: LayerScale, two register tokens, non-trivial LayerNorm affine and biases."""
    torch.manual_seed(0)
    m = timm.create_model("vit_small_patch14_dinov2", img_size=28, num_classes=10, pretrained=False, depth=2,
                          embed_dim=96, num_heads=3, reg_tokens=2, init_values=0.3).eval()
    gen = torch.Generator().manual_seed(1)
    move_off_init(m, 0.5, names=("norm", "gamma", "bias", "token", "pos_embed"), generator=gen)
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
    # float64: measured max |diff| 1.6e-15 with |logits| ~1
    assert rotation_error(*_tiny_dinov2(torch.float64), opts) < 1e-14
    # float32: measured 2.4e-7 .. 4.2e-7
    assert rotation_error(*_tiny_dinov2(torch.float32), opts) < 2e-6


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
    with pytest.raises(UserError, match="rotation.fc2 makes fc2's input no longer post-GELU: it needs gelu=uniform"):
        get_preset("ptq4vit", rotate_fc2=True)
    with pytest.raises(UserError, match="rotation_kind"):
        get_preset("ptq4vit", rotation_kind="givens")
    # a family whose adapter describes no rotation layout is refused by name, before anything changes
    adapters = DEFAULT_ADAPTERS.with_adapter(_NoRotationAdapter())
    assert_refused_untouched(
        _NoRotationNet(), lambda m: apply_rotation(m, RotationOptions(heads=True), adapters=adapters),
        r"^rotation \(rotate_residual, rotate_heads, rotate_fc2\) is not supported for _NoRotationNet by the "
        r"NoRotationNet adapter$")
    untouched, _ = make_tiny("swin")
    assert apply_rotation(untouched, RotationOptions()) is untouched


class _NoRotationNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)


class _NoRotationAdapter(Adapter):
    """An adapter that plans its family but says nothing of rotations."""
    family = "NoRotationNet"
    model_classes = (_NoRotationNet,)

    def plan(self, model, build):
        p = SitePlan(self.family)
        p.container("")
        p.site("fc", model.fc, torch.nn.Linear, build.linear)
        return p


# ------------------------------------------------------------------ Swin: one stream per stage, through patch merging

def _tiny_swin(dtype=torch.float32, **kw):
    """A tiny Swin with shifted windows in two stages (16x16 and 8x8 tokens, windows 4x4, shift 2) and
    two patch mergings; non-trivial LayerNorm affine and biases."""
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2, 2), num_heads=(2, 2, 4),
                num_classes=10)
    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **{**args, **kw}).eval()
    gen = torch.Generator().manual_seed(1)
    move_off_init(m, 0.5, names=("norm", "bias"), generator=gen)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    return m.to(dtype), x.to(dtype)


def test_tiny_swin_has_shifted_windows_and_patch_merging():
    m, _ = _tiny_swin()
    assert [blk.shift_size for stage in m.layers for blk in stage.blocks] == [(0, 0), (2, 2)] * 2 + [(0, 0)] * 2
    assert [blk.attn_mask is not None for stage in m.layers for blk in stage.blocks] == [False, True] * 2 + [False] * 2
    assert [type(stage.downsample).__name__ for stage in m.layers] == ["Identity", "PatchMerging", "PatchMerging"]


@pytest.mark.parametrize("opts", [RotationOptions(residual=True), RotationOptions(heads=True),
                                  RotationOptions(fc2=True), ALL, RotationOptions(True, True, True, "orthogonal", 5)],
                         ids=["residual", "heads", "fc2", "all", "all-orthogonal"])
def test_rotated_swin_reproduces_float_model(opts):
    # float64: measured max |diff| 3.9e-16 with |logits| <= 0.62
    assert rotation_error(*_tiny_swin(torch.float64), opts) < 1e-14
    # float32: measured 6e-8 .. 1.2e-7
    assert rotation_error(*_tiny_swin(), opts) < 1e-6


def test_rotated_swin_with_padded_merging_and_clamped_windows():
    # conftest's tiny Swin: 14x14 tokens, then 7x7 (padded to 8x8 by the next merging), 4x4, 2x2
    m, x = make_tiny("swin")
    m, x = m.double(), x.double()
    ref = m(x)
    assert (apply_rotation(copy.deepcopy(m), ALL)(x) - ref).abs().max() < 1e-14  # measured 4.4e-16


def test_swin_residual_rotation_replaces_norms():
    from ptq4vit.transforms import RotatedLayerNorm

    m, _ = _tiny_swin()
    assert m.layers[1].downsample.reduction.bias is None
    apply_rotation(m, ALL)
    assert isinstance(m.patch_embed.norm, RotatedLayerNorm) and m.patch_embed.norm.weight.shape == (16, 16)
    blk = m.layers[1].blocks[1]
    for norm in (blk.norm1, blk.norm2, m.layers[1].downsample.norm, m.norm):  # each token's mean is kept
        assert type(norm) is torch.nn.LayerNorm and norm.weight is None and norm.bias is None
    assert m.layers[1].downsample.norm.normalized_shape == (64,)
    assert m.layers[1].downsample.reduction.bias is not None  # the merging norm's β, folded
    assert isinstance(blk.mlp.norm, OnlineRotation)


def test_a_rotation_fixing_the_ones_commutes_with_centring():
    from ptq4vit.transforms.orthogonal import fixing_ones

    for n in (16, 96):
        q = fixing_ones(make_rotation(n, "hadamard", torch.Generator().manual_seed(0)).dense())
        assert torch.allclose(q @ q.t(), torch.eye(n, dtype=torch.float64), atol=1e-14, rtol=0)
        ones = torch.ones(n, dtype=torch.float64)
        assert torch.allclose(ones @ q, ones, atol=1e-14, rtol=0)
        x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        ln = torch.nn.functional.layer_norm
        assert torch.allclose(ln(x @ q, (n,)), ln(x, (n,)) @ q, atol=1e-14, rtol=0)


@pytest.mark.parametrize("kw,module,words", [
    (dict(window_size=3), "layers.0.blocks.0", "16x16 tokens to fill whole 3x3 windows"),
    (dict(dynamic_img_size=True), "patch_embed", "fixed image size"),
    (dict(global_pool="max"), "head.global_pool", "not 'max'"),
    (dict(num_classes=0), "head", "Linear fc"),
])
def test_swin_residual_rotation_refuses_what_it_cannot_fold(kw, module, words):
    m, x = _tiny_swin(torch.float64, **kw)
    assert_refused_untouched(m, lambda m: apply_rotation(m, ALL),
                             rf"^module '{re.escape(module)}': residual rotation .*{words}")
    ref = m(x)  # the rotations that do not touch the stream still apply
    assert (apply_rotation(m, RotationOptions(heads=True, fc2=True))(x) - ref).abs().max() < 1e-14


def test_rotq_on_swin_calibrates_round_trips_and_exports(tmp_path):
    m, x = _tiny_swin()
    runs, errors = calibrate_at_w8a8_and_w4a4(m, x, "rotq", max_abs)
    assert errors[8] < errors[4]
    # q is the W4A4 model: its checkpoint rebuilds the rotated structure (bias of the reduction included)
    q, out = runs[4]
    assert_checkpoint_round_trip(q, m, x, tmp_path, want=out)
    pytest.importorskip("onnx")
    for _, rep, got in run_on_onnx_runtime(q, x, tmp_path):
        # 6 blocks x (qkv, proj, fc1, fc2, q@k) + 2 reductions + head.fc; float: the patch conv and softmax@v
        # (rotq's renormalized softmax rows have no integer lowering)
        assert sum(s.integer for s in rep.sites) == 33 and len(rep.sites) == 40
        assert [s.name for s in rep.fallbacks] == ["patch_embed.proj"] + [
            f"layers.{i}.blocks.{j}.attn.matmul2" for i in range(3) for j in range(2)]
        assert [t.name for t in rep.float_transforms] == ["patch_embed.norm"] + [
            f"layers.{i}.blocks.{j}.mlp.norm" for i in range(3) for j in range(2)]
        assert float(abs(got - out.numpy()).max()) < 1e-5  # measured 6e-8


def test_rotq_swin_with_quantization_off_is_the_float_model():
    _, got, ref = rotq_switched_off(*_tiny_swin())
    assert (got - ref).abs().max() < 1e-6  # measured 1.2e-7


def test_vit_without_a_classifier_refuses_the_residual_rotation_but_not_the_others():
    """num_classes=0 leaves no Linear to fold the last rotation into: the features would come out rotated."""
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1, embed_dim=48,
                          num_heads=2, num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert_refused_untouched(m, lambda m: apply_rotation(m, RotationOptions(residual=True)),
                             r"^module 'head' of type Identity: residual rotation needs a Linear classifier "
                             r".*num_classes=0 would return rotated features")  # refused before anything changed
    with torch.no_grad():
        ref = m(x)
        rotated = apply_rotation(copy.deepcopy(m), RotationOptions(heads=True, fc2=True))(x)
    assert (rotated - ref).abs().max() < 1e-5 * ref.abs().max()

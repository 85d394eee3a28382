"""RepQ-ViT as a preset (docs/lowbit.md §6): asymmetric quantizer, percentile ranges, scaled log√2
quantizer, LayerNorm reparameterization, sequential calibration, checkpoints, export, refusals."""
import copy
import math

import pytest
import timm
import torch
from torch import nn

import ptq4vit
from ptq4vit import checkpoint as ck
from ptq4vit.calib.percentile import PERCENTILES, percentile_ranges, quantiles
from ptq4vit.errors import UnsupportedModelError, UserError
from ptq4vit.harness.ablations import REPQ_ABLATION_ROWS
from ptq4vit.quant import (AsymmetricQuantizer, LogQuantizer, asymmetric_codes, asymmetric_dequantize,
                           asymmetric_fake_quant, range_to_step, scaled_log_fake_quant)
from ptq4vit.transforms.reparam import fold_channel_ranges

from conftest import make_tiny


def _tiny(dtype=torch.float32, depth=2):
    torch.manual_seed(0)
    m = timm.create_model("vit_small_patch14_dinov2", img_size=28, num_classes=10, pretrained=False, depth=depth,
                          embed_dim=96, num_heads=3, reg_tokens=1, init_values=0.3).eval().to(dtype)
    x = torch.randn(8, 3, 28, 28, generator=torch.Generator().manual_seed(1)).to(dtype)
    return m, x


# ---- the asymmetric quantizer


def test_asymmetric_codes_and_values_on_hand_made_values():
    # 3 bits: signed codes [-4, 3]; Δ = 0.5, z = -2 puts the range [-1, 2.5] on them
    q = AsymmetricQuantizer(3)
    q.set_params(torch.tensor([0.5]), torch.tensor([-2.0]))
    x = torch.tensor([-2.0, -1.0, -0.26, 0.0, 0.3, 1.24, 2.5, 9.0])
    assert q.codes(x).tolist() == [-4, -4, -3, -2, -1, 0, 3, 3]
    assert q(x).tolist() == [-1.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.5, 2.5]
    # int8 codes (a checkpoint's) dequantize to the same values; half precision rounds once
    assert torch.equal(q.dequantize(q.codes(x).to(torch.int8), torch.float32), q(x))
    assert q(x.half()).dtype == torch.float16 and q(x.half()).tolist() == q(x).tolist()


def test_asymmetric_fake_quant_is_codes_then_values_and_rounds_a_fractional_zero_point_as_released():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4096, generator=g) * 3
    step = torch.tensor(0.07)
    # an integer zero point: exactly the codes, then their values (clamping included)
    for zp in (-5.0, 0.0, 31.0):
        z = torch.tensor(zp)
        assert torch.equal(asymmetric_fake_quant(x, step, z, 6), asymmetric_dequantize(asymmetric_codes(x, step, z, 6),
                                                                                       step, z, torch.float32))
    # the fractional one RepQ-ViT's fold leaves: the released statements with its unsigned zero point
    z = torch.tensor(-0.3)
    unsigned = z + 32
    released = (torch.clamp(torch.round(x / step) + unsigned, 0, 63) - unsigned) * step
    assert torch.equal(asymmetric_fake_quant(x, step, z, 6), released)
    # which the signed form rounds otherwise
    assert not torch.equal(asymmetric_dequantize(asymmetric_codes(x, step, z, 6), step, z, torch.float32), released)


def test_asymmetric_per_channel_weight_and_activation_groups():
    w = AsymmetricQuantizer(4, 2, axis=0)
    w.set_params(torch.tensor([1.0, 0.25]), torch.tensor([0.0, 4.0]))
    x = torch.tensor([[3.4, -9.0, 7.6], [0.3, -1.0, 0.9]])
    # row 0: codes clamp(round(x), -8, 7); row 1: clamp(round(4x) + 4, -8, 7) -> values (c - 4)/4 in [-3, 0.75]
    assert w(x).tolist() == [[3.0, -8.0, 7.0], [0.25, -1.0, 0.75]]
    a = AsymmetricQuantizer(4, 2, axis=-1)   # per channel of a (B, N, C) activation
    a.set_params(torch.tensor([1.0, 0.25]), torch.tensor([0.0, 4.0]))
    assert torch.equal(a(x.t().reshape(1, 3, 2)), w(x).t().reshape(1, 3, 2))


def test_range_to_step_puts_the_range_on_the_codes():
    step, zp = range_to_step(torch.tensor(-1.0), torch.tensor(2.5), 3)
    assert step.item() == 0.5 and zp.item() == -2.0
    step, zp = range_to_step(torch.tensor(1.0), torch.tensor(1.0), 8)  # constant operand: a finite grid
    assert step.item() > 0 and math.isfinite(zp.item())


# ---- percentile ranges


def test_quantiles_equal_torch_quantile_to_the_bit():
    rows = torch.randn(5, 1001, generator=torch.Generator().manual_seed(0)) ** 3
    qs = tuple(PERCENTILES) + tuple(1 - p for p in PERCENTILES)
    got = quantiles(rows, qs)
    for i, q in enumerate(qs):
        assert torch.equal(got[i], torch.quantile(rows, q, dim=1))


def _released_range(row: torch.Tensor, bits: int):
    """One group, as the released RepQ-ViT initialises it: a plain loop over the percentiles (unsigned zp)."""
    best, out = 1e10, None
    levels = 2 ** bits
    for pct in PERCENTILES:
        hi, lo = torch.quantile(row, pct), torch.quantile(row, 1.0 - pct)
        delta = (hi - lo) / (levels - 1)
        zp = (-lo / delta).round()
        xq = (torch.clamp(torch.round(row / delta) + zp, 0, levels - 1) - zp) * delta
        score = (row - xq).abs().pow(2).mean()
        if score < best:
            best, out = score, (delta, zp)
    return out


def test_percentile_ranges_match_a_plain_loop_per_channel():
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(6, 4000, generator=g) * torch.tensor([0.1, 1, 3, 10, 0.5, 2])[:, None]
    rows[3, :5] = 80.0  # outliers: the percentiles now matter
    rows[4] = rows[4].abs() + 0.2  # an all-positive group
    for bits in (4, 8):
        step, zp = percentile_ranges(rows, bits)
        for c in range(len(rows)):
            delta, zp_u = _released_range(rows[c], bits)
            assert step[c].item() == delta.item(), (bits, c)
            assert zp[c].item() == zp_u.item() - 2 ** (bits - 1), (bits, c)


# ---- the scaled log√2 quantizer


def test_scaled_log_sqrt2_on_hand_made_values():
    delta = torch.tensor(0.5)
    x = torch.tensor([1.0, 0.5, 0.25, 0.3, 2.0 ** -4.5, 2.0 ** -5, 0.0])
    got = scaled_log_fake_quant(x, delta, 3, "log_sqrt2")
    # codes round(-2 log2(x/Δ)): -2 -> 0, 0, 2, 1, 7, 8 (>= 2^3: zero), inf (zero)
    want = [0.5, 0.5, 0.25, 0.5 / math.sqrt(2), 0.5 * 2 ** -3.5, 0.0, 0.0]
    assert [got[i].item() for i in (0, 1, 2, 5, 6)] == [want[i] for i in (0, 1, 2, 5, 6)]
    for i in (3, 4):  # odd codes: √2 in float32, one rounding
        assert got[i].item() == pytest.approx(want[i], rel=2e-7)
    q = LogQuantizer(3, "log_sqrt2", scaled=True)
    assert not q.calibrated
    q.set_scale(delta)
    assert torch.equal(q(x), got)


# ---- reparameterization


@pytest.mark.parametrize("round_zp", [False, True])
def test_fold_keeps_the_function_in_float64_and_aligns_every_channel(round_zp):
    g = torch.Generator().manual_seed(3)
    norm = nn.LayerNorm(6).double()
    lin = nn.Linear(6, 4).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(6, generator=g, dtype=torch.float64) * 3)
        norm.bias.copy_(torch.randn(6, generator=g, dtype=torch.float64))
    x = torch.randn(10, 6, generator=g, dtype=torch.float64) * 5
    before = lin(norm(x))
    gamma, beta = norm.weight.detach().clone(), norm.bias.detach().clone()
    scale = torch.tensor([0.1, 0.4, 0.05, 1.0, 0.2, 0.3])
    zp = torch.tensor([-3.0, 0.0, 5.0, -8.0, 2.0, 7.0])   # signed, 4 bits: unsigned mean (5+8+13+0+10+15)/6 = 8.5
    step, zero = fold_channel_ranges(norm, lin, scale, zp, 4, round_zero_point=round_zp)
    assert (lin(norm(x)) - before).abs().max() < 1e-13
    assert step.item() == pytest.approx(float(scale.double().mean()), rel=1e-7)
    assert zero.item() == (0.0 if round_zp else 0.5)       # round(8.5) = 8 (half to even) or 8.5, less qmax = 8
    # every channel's range start -z_c Δ_c is mapped by y/r - b onto the per-tensor one -z Δ
    r = scale.double() / scale.double().mean()
    start = -(zp.double() + 8) * scale.double()
    mapped = (start - beta) / gamma * norm.weight.detach() + norm.bias.detach()  # the new affine at the old range start
    assert torch.allclose(mapped, torch.full((6,), -(zero.item() + 8) * scale.double().mean().item(), dtype=torch.float64),
                          rtol=0, atol=1e-12)
    assert torch.allclose(norm.weight.detach(), gamma / r, rtol=1e-15, atol=0)


def test_fold_rounds_like_the_released_code_op_for_op():
    g = torch.Generator().manual_seed(5)
    norm, lin = nn.LayerNorm(64), nn.Linear(64, 48)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=g) * 3 + 0.1)
        norm.bias.copy_(torch.randn(64, generator=g))
    scale = torch.rand(64, generator=g) * 0.3 + 0.01
    zp = torch.randint(-8, 8, (64,), generator=g).float()
    # the released code's statements, in float32, with its unsigned zero points
    d, z = scale, zp + 8
    td, tz = d.mean(), z.mean()
    r = d / td
    b = (-z * d) / r - (-tz * td)
    ref_gamma, ref_beta = norm.weight.detach() / r, norm.bias.detach() / r - b
    ref_w = lin.weight.detach() * r
    ref_bias = lin.bias.detach() + torch.mm(ref_w, b.reshape(-1, 1)).reshape(-1)
    exact_norm, exact_lin = copy.deepcopy(norm), copy.deepcopy(lin)
    fold_channel_ranges(norm, lin, scale, zp, 4)
    for got, ref in ((norm.weight, ref_gamma), (norm.bias, ref_beta), (lin.weight, ref_w), (lin.bias, ref_bias)):
        assert torch.equal(got.detach(), ref)
    # in float64 it rounds once at the end: it differs in the last bits somewhere
    fold_channel_ranges(exact_norm, exact_lin, scale, zp, 4, dtype=torch.float64)
    assert not torch.equal(exact_lin.bias.detach(), ref_bias) or not torch.equal(exact_norm.bias.detach(), ref_beta)
    assert torch.allclose(exact_lin.bias.detach(), ref_bias, rtol=1e-5, atol=1e-5)


def test_repq_model_with_quantization_off_is_the_float_model_in_float64():
    m, x = _tiny(torch.float64)
    ref = m(x)
    q = ptq4vit.quantize(m, x, "repq-vit", 4, 4, progress=False)
    with q.quantization_disabled():
        off = q(x)
    assert (off - ref).abs().max() < 1e-12
    # the fold changed the LayerNorms and qkv/fc1 (a zero-effect fold would also pass the line above)
    assert not torch.equal(q.model.blocks[0].norm1.weight, m.blocks[0].norm1.weight)
    assert q.model.blocks[0].attn.qkv.a_quant.groups == 1


def test_activations_are_calibrated_on_the_outputs_of_quantized_layers():
    # without the fold, every site's input in the finished quantized model is what calibration saw
    m, x = _tiny()
    q = ptq4vit.quantize(m, x, "repq-vit", 4, 4, progress=False, reparam_ln=False)
    seen = {}
    site = q.model.blocks[1].attn.proj
    h = site.register_forward_pre_hook(lambda mod, a: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        q(x)
    h.remove()
    step, zp = percentile_ranges(seen["x"].reshape(1, -1), 4)
    assert site.a_quant.scale.item() == step.item() and site.a_quant.zero_point.item() == zp.item()
    with q.quantization_disabled(), torch.no_grad():  # the float input would give another range
        h = site.register_forward_pre_hook(lambda mod, a: seen.__setitem__("f", a[0]))
        q(x)
        h.remove()
    assert percentile_ranges(seen["f"].reshape(1, -1), 4)[0].item() != step.item()


def test_repq_quantizes_every_site_with_zero_points_and_reports_them():
    m, x = _tiny()
    q = ptq4vit.quantize(m, x, "repq-vit", 6, 6, progress=False)
    p = q.qparams()["modules"]
    assert len(p["blocks.0.attn.qkv"]["w_zero_point"]) == 288 and len(p["blocks.0.attn.qkv"]["a_zero_point"]) == 1
    assert p["patch_embed.proj"]["a_scale"] and p["blocks.0.attn.matmul2"]["a_log"] == "log_sqrt2"
    assert q.model.patch_embed.proj.a_quant.bits == 8  # the image at 8 bits, whatever a_bits
    assert q.model.head.a_quant.bits == 6 and q.model.head.w_quant.bits == 6
    assert q.model.blocks[0].attn.qkv.bias is not None


# ---- checkpoint, export, presets, refusals


def test_repq_checkpoint_round_trip_is_bit_identical(tmp_path):
    m, x = _tiny()
    m.blocks[0].attn.qkv.bias = None  # a bias-free qkv gets a (zero, then folded) bias from the preset
    q = ptq4vit.quantize(m, x, "repq-vit", 4, 4, progress=False)
    ck.save(q, tmp_path / "r.safetensors")
    r = ck.load(tmp_path / "r.safetensors")
    with torch.no_grad():
        assert torch.equal(q(x), r(x))
    assert torch.equal(r.model.blocks[1].mlp.fc1.a_quant.zero_point, q.model.blocks[1].mlp.fc1.a_quant.zero_point)


def test_repq_export_lists_every_float_part_and_matches_torch(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from ptq4vit.export import export_onnx
    from ptq4vit.export.bench import compare_outputs
    from ptq4vit.export.ort import make_session

    from ptq4vit.export import AllFloatError

    m, x = _tiny(depth=1)
    q = ptq4vit.quantize(m, x, "repq-vit", 8, 8, progress=False)
    for fmt in ("contrib", "qdq"):
        # no site runs in integers: refused by default, nothing written
        with pytest.raises(AllFloatError, match=rf"no quantization site of .* would run in integers in the {fmt} "
                                                r"graph: all 8 stay float \(1 conv, 5 linear, 2 matmul\); "
                                                r"pass allow_float=True to write it anyway"):
            export_onnx(q, tmp_path / f"{fmt}.onnx", format=fmt)
        assert not (tmp_path / f"{fmt}.onnx").exists()
        rep = export_onnx(q, tmp_path / f"{fmt}.onnx", format=fmt, allow_float=True)
        assert rep.placement() == {"conv": (0, 1), "linear": (0, 5), "matmul": (0, 2)}
        assert "  0/8 quantization sites run as integer matmuls; 8 stay float (1 conv, 5 linear, 2 matmul)" \
            in rep.summary().splitlines()
        assert sorted(s.name for s in rep.fallbacks) == sorted(q.sites())  # no site silently "integer"
        reasons = {s.name: s.reason for s in rep.fallbacks}
        assert "AsymmetricQuantizer" in reasons["blocks.0.attn.qkv"]
        assert "LogQuantizer" in reasons["blocks.0.attn.matmul2"] or "AsymmetricQuantizer" in reasons["blocks.0.attn.matmul2"]
        assert "quantized conv input" in reasons["patch_embed.proj"]
        with torch.no_grad():
            ref = q(x).numpy()
        out = make_session(str(tmp_path / f"{fmt}.onnx")).run(None, {"input": x.numpy()})[0]
        c = compare_outputs(ref, out)
        assert c["max_abs_logit_error"] <= 1e-3 * c["max_abs_logit"], fmt


@pytest.mark.parametrize("overrides, match", [
    (dict(reparam_ln=True), "the ln_reparam transform needs calibration=percentile"),
    (dict(softmax_log_scale=True, softmax_log="log_sqrt2"), "override softmax_log_scale=True would change nothing"),
    (dict(patch_input_bits=8), "patch_input_bits needs calibration=percentile"),
    (dict(calibration="percentile"), "calibration=percentile has no initialisation for softmax=twin; gelu=twin"),
    (dict(calibration="grid"), "calibration must be one of"),
    (dict(reparam_fold_float64=True), "override reparam_fold_float64=True would change nothing"),
    (dict(reparam_fold_float64="yes"), "reparam_fold_float64 must be True"),
])
def test_preset_validation_errors(overrides, match):
    with pytest.raises(UserError, match=match):
        ptq4vit.get_preset("ptq4vit", **overrides)


def test_repq_preset_refusals():
    with pytest.raises(UserError, match="ln_reparam folds into LayerNorm's affine, which rotation.residual folds away"):
        ptq4vit.get_preset("repq-vit", rotate_residual=True)
    with pytest.raises(UserError, match="patch_input_bits"):
        ptq4vit.get_preset("repq-vit", patch_input_bits=9)
    with pytest.raises(UserError, match="no initialisation for weights .*percentile weights are per channel"):
        ptq4vit.get_preset("repq-vit", w_granularity="channel")
    # percentile calibration calibrates a log softmax quantizer's largest level: no switch to set for it
    assert ptq4vit.get_preset("ptq4vit", calibration="percentile", gelu_twin=False,
                              softmax_log="log2").softmax_log_scale is True
    for label, overrides in REPQ_ABLATION_ROWS.items():
        assert ptq4vit.get_preset("repq-vit", **overrides).overrides() == overrides, label


def test_reparam_is_refused_by_name_where_it_does_not_apply():
    swin, images = make_tiny("swin")
    with pytest.raises(UnsupportedModelError, match="reparam_ln.*SwinTransformer"):
        ptq4vit.quantize(swin, images, "repq-vit", 8, 8, progress=False)
    m, x = _tiny(depth=1)
    m.blocks[0].norm2 = nn.LayerNorm(96, elementwise_affine=False)
    with pytest.raises(UnsupportedModelError, match="blocks.0.norm2"):
        ptq4vit.quantize(m, x, "repq-vit", 8, 8, progress=False)


def test_swin_takes_repq_without_the_fold():
    swin, images = make_tiny("swin")
    q = ptq4vit.quantize(swin, images, "repq-vit", 8, 8, progress=False, reparam_ln=False)
    with torch.no_grad():
        out, ref = q(images), swin(images)
    assert out.shape == ref.shape and torch.isfinite(out).all()

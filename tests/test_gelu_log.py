"""The post-GELU log quantizer (docs/lowbit.md §8): values, search, dtypes, presets, checkpoints, export."""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import ptq4vit
from ptq4vit import checkpoint as ck
from ptq4vit.calib.calibrate import calibrate_linear
from ptq4vit.errors import UnsupportedModelError, UserError
from ptq4vit.nn import QuantLinear
from ptq4vit.harness.ablations import POST_GELU_ROWS
from ptq4vit.presets import get_preset
from ptq4vit.recipes import get_recipe
from ptq4vit.quant import (GeluLogQuantizer, UniformQuantizer, gelu_log_codes, gelu_log_dequantize, gelu_log_fake_quant,
                           gelu_twin_neg_step, uniform_fake_quant)

from conftest import make_tiny_dinov2
from test_search import spec_score
from test_search_refs import f32, factors, first_best


def _neg(bits):
    return f32(gelu_twin_neg_step(bits))


def test_log2_levels_zero_negatives_and_clamping_on_hand_made_values():
    # 3 bits: codes -4..3. Positive codes 3, 2, 1 are Δ, Δ/2, Δ/4 (Δ = 3); code 0 is zero; negatives are k·Δ-.
    x = torch.tensor([5.0, 3.0, 2.2, 2.0, 1.0, 0.6, 0.5, 1e-30, 0.0, -0.02, -0.03, -0.17, -0.5])
    scale, neg = f32([3.0]), _neg(3)
    codes = gelu_log_codes(x, scale, neg, 3, "log2")
    # 2.2: log2(2.2/3) = -0.45 -> Δ; 2.0: -0.58 -> Δ/2; 0.6: -2.32 -> Δ/4; 0.5: -2.58 rounds past the smallest level -> 0
    assert codes.tolist() == [3, 3, 3, 2, 1, 1, 0, 0, 0, 0, -1, -4, -4]
    got = gelu_log_fake_quant(x, scale, neg, 3, "log2")
    want = torch.cat([torch.tensor([3.0, 3.0, 3.0, 1.5, 0.75, 0.75, 0.0, 0.0, 0.0, 0.0]),
                      torch.tensor([-1.0, -4.0, -4.0]) * neg])
    assert torch.equal(got, want)
    assert float(neg) * 4 == pytest.approx(0.16997124, rel=1e-7)   # the negative grid ends at GELU's minimum


def test_log_sqrt2_has_two_levels_per_halving():
    # 4 bits: positive codes 7..1 are Δ·√2^(c-7), down to Δ/8
    x = torch.tensor([1.0, 0.75, 0.5, 0.13, 0.1, -0.01])
    codes = gelu_log_codes(x, f32([1.0]), _neg(4), 4, "log_sqrt2")
    assert codes.tolist() == [7, 6, 5, 1, 0, 0]  # 0.13: 2·log2 = -5.9 -> 2^-3; 0.1: -6.6 -> past the smallest level
    got = gelu_log_fake_quant(x, f32([1.0]), _neg(4), 4, "log_sqrt2")
    assert torch.equal(got, torch.tensor([1.0, 2 ** -0.5, 0.5, 0.125, 0.0, 0.0]))


@pytest.mark.parametrize("base", ["log2", "log_sqrt2"])
def test_codes_cover_the_signed_range_monotonically_and_dequantize_to_the_fake_quantized_values(base):
    bits = 4
    x = torch.linspace(-0.3, 3.0, 4001)
    scale, neg = f32([2.0]), _neg(bits)
    codes = gelu_log_codes(x, scale, neg, bits, base)
    assert codes.min() == -8 and codes.max() == 7
    assert set(codes.tolist()) == set(range(-8, 8))            # every code is used on this sweep
    assert bool((codes.diff() >= 0).all())                      # monotone in x
    values = gelu_log_fake_quant(x, scale, neg, bits, base)
    assert torch.equal(gelu_log_dequantize(codes.to(torch.int8), scale, neg, bits, base, torch.float32), values)
    assert bool((values.diff() >= 0).all())


@pytest.mark.parametrize("base", ["log2", "log_sqrt2"])
def test_a_stack_of_candidate_scales_equals_one_call_per_scale(base):
    x = F.gelu(torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(3)) * 3)
    scales = torch.tensor([0.05, 0.4, 1.0, 2.5, 9.0])
    stacked = gelu_log_fake_quant(x.unsqueeze(0), scales.reshape(-1, 1, 1, 1), _neg(5), 5, base)
    for i, s in enumerate(scales):
        assert torch.equal(stacked[i], gelu_log_fake_quant(x, s.reshape(1), _neg(5), 5, base))


def spec_gelu_log_linear(x, w, bias, grad, metric, preset, w_bits, a_bits, base, neg):
    """fc2 with a post-GELU log input, as plain loops: Δ (the largest level) searched over the grid's
    multiples of the largest input value, alternating with the weight's per-tensor scale."""
    grid = factors(preset)
    a0 = x.max()
    w0 = w.abs().max() / (2 ** (w_bits - 1) - 0.5)
    out = F.linear(x, w, bias)
    a_scale = a0
    for _ in range(preset.rounds):
        xq = gelu_log_fake_quant(x, a_scale.reshape(1), neg, a_bits, base)
        w_scale = f32(grid[first_best([spec_score(F.linear(xq, uniform_fake_quant(w, f32(f) * w0, w_bits), bias), out,
                                                  grad, metric) for f in grid])]) * w0
        wq = uniform_fake_quant(w, w_scale, w_bits)
        a_scale = f32(grid[first_best([spec_score(F.linear(gelu_log_fake_quant(x, (f32(f) * a0).reshape(1), neg, a_bits,
                                                                               base), wq, bias), out, grad, metric)
                                       for f in grid])]) * a0
    return w_scale, a_scale


@pytest.mark.parametrize("metric,base", [("cosine", "log2"), ("mse", "log_sqrt2"), ("hessian", "log2"),
                                         ("hessian", "log_sqrt2")])
def test_the_batched_search_picks_what_a_loop_over_candidates_picks(metric, base):
    torch.manual_seed(5)
    x = F.gelu(torch.randn(3, 9, 16) * 2)
    x[0, 0, 3] = 9.0   # one outlier: the best largest level is well below max(x)
    lin = nn.Linear(16, 6)
    grad = torch.randn(3, 9, 6)
    preset = get_preset("ptq4vit", metric=metric, n_candidates=20, rounds=2, gelu_twin=False, gelu_log=base)
    quant = GeluLogQuantizer(4, base)
    want_w, want_a = spec_gelu_log_linear(x, lin.weight.detach(), lin.bias.detach(), grad, metric, preset, 4, 4, base,
                                          quant.neg_scale)
    site = QuantLinear(lin, UniformQuantizer(4), quant)
    calibrate_linear(site, x, grad, get_recipe(preset), budget=1 << 20)
    assert torch.allclose(site.w_quant.scale, want_w.reshape(1), rtol=1e-6, atol=0)
    assert torch.equal(site.a_quant.scale, want_a.reshape(1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_operands_get_the_float32_codes(dtype):
    x = (F.gelu(torch.randn(4000, generator=torch.Generator().manual_seed(0)) * 3)).to(dtype)
    q = GeluLogQuantizer(4, "log_sqrt2")
    q.set_scale(f32([1.7]))
    assert torch.equal(q.codes(x), q.codes(x.float()))
    assert torch.equal(q.fake_quant(x), q.fake_quant(x.float()).to(dtype))
    assert q.fake_quant(x).dtype == dtype
    q.to(dtype)   # a half-precision model keeps its scales in float32
    assert q.scale.dtype == torch.float32 and q.neg_scale.dtype == torch.float32


def test_gelu_log_is_validated():
    with pytest.raises(UserError, match="gelu_log must be one of"):
        get_preset("ptq4vit", gelu_twin=False, gelu_log="log3")
    with pytest.raises(UserError, match="gelu_log='log2' and gelu_twin"):
        get_preset("ptq4vit", gelu_log="log2")
    with pytest.raises(UserError, match="rotation.fc2 makes fc2's input no longer post-GELU: it needs gelu=uniform, not gelu=log"):
        get_preset("rotq", gelu_log="log_sqrt2")
    with pytest.raises(UserError, match="calibration=percentile has no initialisation for gelu=log"):
        get_preset("repq-vit", gelu_log="log2")
    with pytest.raises(ValueError, match="base"):
        GeluLogQuantizer(4, "log3")


def test_post_gelu_rows_are_valid_ptq4vit_variants():
    as_is = get_preset("ptq4vit")
    kinds = {(as_is.gelu_twin, as_is.gelu_log)}
    for label, overrides in POST_GELU_ROWS.items():
        p = get_preset("ptq4vit", **overrides)
        kinds.add((p.gelu_twin, p.gelu_log))
        assert p.overrides() == overrides, f"{label}: an override equal to ptq4vit's own value runs ptq4vit again"
    assert len(kinds) == len(POST_GELU_ROWS) + 1
    assert kinds == {(True, "none"), (False, "none"), (False, "log2"), (False, "log_sqrt2")}



@pytest.mark.parametrize("preset,overrides", [
    ("ptq4vit", dict(gelu_twin=False, gelu_log="log2")),
    # the second-order path (GPTQ weights) searches the same input quantizer
    ("rotq", dict(rotate_fc2=False, gelu_log="log_sqrt2")),
])
def test_checkpoint_round_trip_is_bit_identical(preset, overrides, tmp_path):
    m, x = make_tiny_dinov2(depth=2)
    q = ptq4vit.quantize(m, x, preset, 4, 4, progress=False, n_candidates=6, rounds=1, **overrides)
    fc2 = q.model.blocks[1].mlp.fc2
    assert isinstance(fc2.a_quant, GeluLogQuantizer) and fc2.a_quant.base == overrides["gelu_log"]
    params = q.qparams()
    entry = params["modules"]["blocks.1.mlp.fc2"]
    assert entry["a_log"] == overrides["gelu_log"] and entry["a_neg_scale"] == float(fc2.a_quant.neg_scale)
    assert ck.structure(q)["sites"]["blocks.1.mlp.fc2"]["a_quant"] == {"type": "GeluLogQuantizer", "bits": 4,
                                                                       "base": overrides["gelu_log"]}
    ck.save(q, tmp_path / "q.safetensors")
    q2 = ptq4vit.load(tmp_path / "q.safetensors")
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))
    assert q2.qparams() == params
    assert torch.equal(q2.model.blocks[1].mlp.fc2.a_quant.scale, fc2.a_quant.scale)


@pytest.mark.parametrize("fmt", ["contrib", "qdq"])
def test_export_lists_each_log_quantized_fc2_as_a_float_part(fmt, tmp_path):
    pytest.importorskip("onnxruntime")
    from ptq4vit.export import export_onnx
    from ptq4vit.export.bench import compare_outputs
    from ptq4vit.export.ort import make_session

    m, x = make_tiny_dinov2(depth=2)
    q = ptq4vit.quantize(m, x, "ptq4vit", 8, 8, progress=False, n_candidates=6, rounds=1, gelu_twin=False,
                         gelu_log="log2")
    rep = export_onnx(q, tmp_path / "m.onnx", format=fmt)
    assert sorted(s.name for s in rep.fallbacks) == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2", "patch_embed.proj"]
    for s in rep.fallbacks:
        if s.name.endswith("fc2"):
            assert s.reason == "no integer lowering for input quantizer GeluLogQuantizer"
            assert s.lowering == "float MatMul on fake-quantized operands"
    assert "float fallback, 2 linears: no integer lowering for input quantizer GeluLogQuantizer" in rep.summary()
    with torch.no_grad():
        ref = q(x).numpy()
    c = compare_outputs(ref, make_session(str(tmp_path / "m.onnx")).run(None, {"input": x.numpy()})[0])
    assert c["max_abs_logit_error"] <= 0.05 * c["max_abs_logit"]


def test_a_model_without_gelu_is_refused_by_name():
    m = timm.create_model("vit_small_patch14_dinov2", img_size=28, num_classes=10, pretrained=False, depth=1,
                          embed_dim=96, num_heads=3, act_layer=nn.ReLU).eval()
    with pytest.raises(UnsupportedModelError, match="post-GELU log quantizer"):
        ptq4vit.quantize(m, torch.randn(2, 3, 28, 28), "ptq4vit", 4, 4, progress=False, gelu_twin=False,
                         gelu_log="log2")

"""The deployment preset ``deploy8``: only the linear layers are quantized (attention float, no
twins), the inputs of qkv, fc1 and fc2 smoothed. Its QDQ graph runs on OpenVINO as NNCF's int8
models do (every linear an integer layer, the activation quantizers fused into the ops before
them) and agrees with the fake-quantized torch model as closely as float rounding allows."""
import numpy as np
import pytest
import timm
import torch

import ptq4vit
from ptq4vit import checkpoint as ck
from ptq4vit.calib.bias_correction import bias_shift, correct_bias
from ptq4vit.calib.calibrate import calibrate_site, smoothing_factors
from ptq4vit.errors import UserError
from ptq4vit.nn import FloatMatMul, QuantLinear, QuantMatMul
from ptq4vit.quant import AsymmetricQuantizer, UniformQuantizer
from ptq4vit.presets import get_preset, parse_field

from test_export import MODELS, torch_out

IMAGES = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
_CACHE: dict = {}


def deploy(key="vit", **overrides):
    """A tiny model calibrated with deploy8 (the real search: it is fast at this size)."""
    cache_key = (key, tuple(sorted(overrides.items())))
    if cache_key not in _CACHE:
        name, kw = MODELS[key]
        torch.manual_seed(0)
        m = timm.create_model(name, pretrained=False, **kw).eval()
        _CACHE[cache_key] = (m, ptq4vit.quantize(m, IMAGES, "deploy8", 8, 8, progress=False, threads=1, **overrides))
    return _CACHE[cache_key]


def test_new_preset_fields_are_typed_and_checked():
    assert get_preset("deploy8").quantize_attention is False and get_preset("ptq4vit").quantize_attention is True
    assert parse_field("quantize_attention", "off") is False
    assert parse_field("smooth_alpha", "0.25") == 0.25
    with pytest.raises(UserError, match=r"smoothing.alpha must be in \(0, 1\]"):
        get_preset("deploy8", smooth_alpha=1.5)
    with pytest.raises(UserError, match="quantize_attention must be True or False"):
        get_preset("deploy8", quantize_attention="no")
    with pytest.raises(UserError, match="preset field smooth_alpha must be a finite number, got .strong."):
        parse_field("smooth_alpha", "strong")


def test_smoothing_factors_on_hand_made_tensors():
    x = torch.tensor([[1.0, -4.0, 0.0, 2.0], [-9.0, 1.0, 0.0, 0.5]])
    w = torch.tensor([[1.0, 0.5, 3.0, 0.0], [-4.0, 2.0, 1.0, 0.0]])
    s = smoothing_factors(x, w, 0.5)
    # max|x| = 9, 4, 0, 2; max|W| per input column = 4, 2, 3, 0: sqrt(9/4), sqrt(4/2); zero channels keep 1
    assert torch.equal(s, torch.tensor([1.5, 2.0 ** 0.5, 1.0, 1.0]))
    assert torch.equal(smoothing_factors(x, w, 1.0)[:2], torch.tensor([9.0, 4.0]))


def test_deployment_switches_are_typed_and_checked():
    assert get_preset("deploy8").asymmetric_inputs is True and get_preset("deploy8").bias_correction is True
    assert get_preset("ptq4vit").asymmetric_inputs is False and get_preset("ptq4vit").bias_correction is False
    assert parse_field("bias_correction", "off") is False
    with pytest.raises(UserError, match="asymmetric_inputs must be True or False"):
        get_preset("deploy8", asymmetric_inputs="yes")
    with pytest.raises(UserError, match="calibration=percentile has no initialisation for inputs=asymmetric"):
        get_preset("repq-vit", asymmetric_inputs=True)
    with pytest.raises(UserError, match="calibration=percentile has no initialisation for the bias_correction transform"):
        get_preset("repq-vit", bias_correction=True)


def test_deploy_ablation_rows_are_valid_presets():
    from ptq4vit.harness.ablations import DEPLOY_ABLATION_ROWS
    for label, overrides in DEPLOY_ABLATION_ROWS.items():
        assert get_preset("deploy8", **overrides).overrides() == overrides, label


def _linear_site(a_quant, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(6, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 6, generator=g))
        lin.bias.copy_(torch.randn(4, generator=g))
    return QuantLinear(lin, UniformQuantizer(8, 4, axis=0), a_quant)


@pytest.mark.parametrize("low,high,step,zero_point", [(-1.0, 3.0, 4 / 255, -64), (0.0, 2.0, 2 / 255, -128),
                                                      (-2.0, -0.5, 2 / 255, 127)])
def test_asymmetric_input_range_and_codes_on_hand_made_tensors(low, high, step, zero_point):
    """The input's range, widened to include 0, on all 256 codes: Δ = (max - min) / 255,
    z = round(-min / Δ) - 128 (one candidate on the grid, factor 1: the range itself)."""
    site = _linear_site(AsymmetricQuantizer(8))
    x = torch.linspace(low, high, 60).reshape(1, 10, 6)
    preset = get_preset("deploy8", alpha=1.0, beta=1.2, n_candidates=1, bias_correction=False, smooth_alpha=0.0)
    calibrate_site(site, [x], None, preset, 1 << 24)
    aq = site.a_quant
    assert aq.calibrated and aq.zero_point.item() == zero_point
    assert aq.scale.item() == torch.tensor(step, dtype=torch.float32).item()
    # every code in reach, zero a code, values beyond the range clamped
    probe = torch.tensor([min(low, 0.0), 0.0, max(high, 0.0), high + 5, low - 5])
    lowest, zero = -128, zero_point
    assert aq.codes(probe).tolist() == [lowest, zero, 127, 127, lowest]
    assert aq.fake_quant(torch.tensor([0.0])).item() == 0.0


def test_bias_correction_matches_a_plain_loop():
    """The bias moves by the mean over the rows of (x Wᵀ - q(x) q(W)ᵀ), computed here one row and
    one output at a time; afterwards the quantized layer's mean output is the float layer's."""
    aq = UniformQuantizer(8)
    aq.set_scale(torch.tensor([0.07]))           # coarse: a visible systematic error
    site = _linear_site(aq)
    site.w_quant.set_scale(site.weight.detach().abs().amax(1) / 127.5 * 1.9)
    w_float = site.weight.detach().clone()
    x = torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(2)) + 0.4
    rows = x.reshape(-1, 6).double()
    qx = aq.fake_quant(x.reshape(-1, 6)).double()
    qw = site.w_quant.fake_quant(site.weight.detach()).double()
    expected = []
    for j in range(4):
        total = 0.0
        for r in range(rows.shape[0]):
            total += sum(float(rows[r, k] * w_float[j, k]) - float(qx[r, k] * qw[j, k]) for k in range(6))
        expected.append(total / rows.shape[0])
    before = site.bias.detach().clone()
    assert torch.allclose(bias_shift(site, x, w_float), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    correct_bias(site, x, w_float)
    shift = (site.bias.detach() - before).double()
    assert torch.allclose(shift, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)
    assert max(abs(e) for e in expected) > 1e-3  # the error was not already zero
    with torch.no_grad():
        quant_mean = site(x).reshape(-1, 4).double().mean(0)
        float_mean = torch.nn.functional.linear(x, w_float, before).reshape(-1, 4).double().mean(0)
    assert torch.allclose(quant_mean, float_mean, rtol=0, atol=1e-5)


def test_linear_without_bias_is_left_alone():
    lin = torch.nn.Linear(6, 4, bias=False)
    aq = UniformQuantizer(8)
    aq.set_scale(torch.tensor([0.05]))
    site = QuantLinear(lin, UniformQuantizer(8, 4, axis=0), aq)
    site.w_quant.set_scale(torch.full((4,), 0.01))
    correct_bias(site, torch.randn(5, 6), lin.weight.detach().clone())
    assert site.bias is None


@pytest.mark.parametrize("zero_point,groups,why", [(0.5, 1, "zero point 0.5"), (3.0, 6, "6 groups")])
def test_export_refuses_asymmetric_inputs_it_cannot_represent(zero_point, groups, why, tmp_path):
    """A fractional zero point (RepQ-ViT's unrounded fold) or per-channel zero points have no integer
    lowering: the layer is a listed float fallback, never an integer GEMM with a misread scale."""
    from ptq4vit.export import export_onnx
    from ptq4vit.quantized import QuantizedModel
    aq = AsymmetricQuantizer(8, groups, axis=-1 if groups > 1 else None)
    aq.set_params(torch.full((groups,), 0.02), torch.full((groups,), zero_point))
    site = _linear_site(aq)
    site.w_quant.set_scale(torch.full((4,), 0.01))
    wrapped = QuantizedModel(torch.nn.Sequential(site), get_preset("deploy8"), 8, 8, "site")
    for fmt in ("qdq", "contrib"):
        rep = export_onnx(wrapped, tmp_path / f"{fmt}.onnx", input_size=(5, 6), format=fmt,
                          allow_float=True)  # its one site is the float fallback under test
        assert not rep.sites[0].integer and why in rep.sites[0].reason, rep.sites[0]


def test_only_linear_layers_are_sites_and_attention_stays_float():
    m, q = deploy("vit")
    sites = q.sites()
    assert not any(isinstance(s, QuantMatMul) for s in sites.values())
    floats = [n for n, mod in q.model.named_modules() if isinstance(mod, FloatMatMul)]
    assert floats == [f"blocks.{i}.attn.matmul{j}" for i in range(2) for j in (1, 2)]
    smoothed = sorted(n for n, s in sites.items() if isinstance(s, QuantLinear) and s.smooth is not None)
    assert smoothed == sorted(f"blocks.{i}.{p}" for i in range(2) for p in ("attn.qkv", "mlp.fc1", "mlp.fc2"))
    assert all(not torch.all(sites[n].smooth == 1) for n in smoothed)
    # zero-point inputs where a runtime fuses them (not proj: its quantizer fuses into attention only when symmetric)
    asym = sorted(n for n, s in sites.items() if isinstance(s.a_quant, AsymmetricQuantizer))
    assert asym == sorted(smoothed + ["head"])
    assert all(isinstance(sites[f"blocks.{i}.attn.proj"].a_quant, UniformQuantizer) for i in range(2))


def test_smoothing_keeps_the_float_function():
    """x / s times W diag(s) is x Wᵀ up to float rounding: with its quantizers off the smoothed
    model is the float model (bias correction, which changes the biases, off)."""
    m, q = deploy("vit", bias_correction=False)
    with q.quantization_disabled():
        out = torch_out(q, IMAGES)
    ref = torch_out(m, IMAGES)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def test_export_report_lists_the_float_attention(tmp_path):
    from ptq4vit.export import export_onnx
    _, q = deploy("vit")
    rep = export_onnx(q, tmp_path / "q.onnx", format="qdq")
    floats = {s.name: s.reason for s in rep.fallbacks}
    assert set(floats) == {"patch_embed.proj"} | {f"blocks.{i}.attn.matmul{j}" for i in range(2) for j in (1, 2)}
    assert "quantize_attention=False" in floats["blocks.0.attn.matmul1"]
    assert sum(s.integer for s in rep.sites) == 9  # qkv, proj, fc1, fc2 of two blocks, the head
    assert "float fallback, 4 matmuls: kept float by the preset" in rep.summary()


def test_checkpoint_round_trip_keeps_the_smoothing(tmp_path):
    m, q = deploy("vit")
    ck.save(q, tmp_path / "d.safetensors")
    q2 = ptq4vit.load(tmp_path / "d.safetensors")
    assert torch.equal(q2.model.blocks[1].mlp.fc2.smooth, q.model.blocks[1].mlp.fc2.smooth)
    np.testing.assert_array_equal(torch_out(q2, IMAGES), torch_out(q, IMAGES))
    # calibration rewrote the linear weights (W diag(s), rounded), yet the checkpoint names the
    # float weights it came from: loading onto them works, onto other weights is refused
    assert ck.read_metadata(tmp_path / "d.safetensors")["float_weights_sha256"] == ck.float_weights_digest(m)
    np.testing.assert_array_equal(torch_out(ptq4vit.load(tmp_path / "d.safetensors", model=m), IMAGES),
                                  torch_out(q, IMAGES))
    other = timm.create_model(MODELS["vit"][0], pretrained=False, **MODELS["vit"][1]).eval()
    with pytest.raises(ck.CheckpointError, match="other float weights"):
        ptq4vit.load(tmp_path / "d.safetensors", model=other)


def test_quantize_linear_is_repeated_right_after_the_op_it_quantizes(tmp_path):
    """proj's input quantizer is repeated above the head-merging Transpose/Reshape, on the
    attention output, where OpenVINO fuses it; ONNX Runtime still runs every linear layer as an
    integer GEMM (the attention products stay float MatMuls)."""
    import onnx
    from ptq4vit.export import export_onnx
    from ptq4vit.export.ort import optimized_op_counts
    _, q = deploy("vit")
    export_onnx(q, tmp_path / "q.onnx", format="qdq")
    g = onnx.load(str(tmp_path / "q.onnx")).graph
    producer = {o: n for n in g.node for o in n.output}
    proj = [n for n in g.node if n.op_type == "QuantizeLinear" and "attn/proj" in n.name]
    assert sorted(producer[n.input[0]].op_type for n in proj) == ["MatMul", "MatMul", "Reshape", "Reshape"]
    ops = optimized_op_counts(str(tmp_path / "q.onnx"))
    assert ops.get("MatMulIntegerToFloat") == 9 and ops.get("MatMul") == 2 and "DequantizeLinear" not in ops


ov = pytest.importorskip("openvino")


@pytest.mark.parametrize("key", ["vit", "swin"])
def test_openvino_runs_every_linear_in_integers_with_fused_quantizers(key, tmp_path):
    from ptq4vit.export import export_onnx
    from ptq4vit.export.openvino import INTEGER_PRECISIONS, compile_onnx, executed_layers
    _, q = deploy(key)
    rep = export_onnx(q, tmp_path / "q.onnx", format="qdq")
    m = compile_onnx(tmp_path / "q.onnx", "f32", threads=1)
    fc = executed_layers(m, ("FullyConnected",))
    n_linear = sum(s.integer for s in rep.sites)
    # one per linear layer (the tiny Swin's first fc2 executes as two integer layers)
    assert len(fc) == n_linear if key == "vit" else len(fc) >= n_linear
    assert all(prec in INTEGER_PRECISIONS for _, prec, _ in fc), fc
    assert [k for k, _, _ in executed_layers(m, ("MatMul",))] == []  # attention runs inside fused Subgraphs
    if key == "vit":  # every quantizer but the head's (on the class token, after a Gather) is a post-op
        standalone = [names for _, _, names in executed_layers(m, ("FakeQuantize",))]
        assert len(standalone) == 1 and "head" in standalone[0], standalone


@pytest.mark.parametrize("key", ["vit"])
def test_runtimes_agree_with_fake_quant_torch_as_closely_as_float_rounding_allows(key, tmp_path):
    """As tests/test_openvino.py: each runtime within 1.5x the torch model's change under a
    relative input perturbation the size of the float graphs' ORT/OpenVINO difference."""
    from _family_checks import OPENVINO_INT8_EXACT
    from test_openvino import _rel, runtime_outputs_and_noise_floor
    _, q = deploy(key)
    ref, q_ort, q_ov, floor = runtime_outputs_and_noise_floor(q, tmp_path)
    assert _rel(q_ort, ref) <= 1.5 * floor + 1e-6
    if OPENVINO_INT8_EXACT:  # without VNNI OpenVINO's products saturate (tests/test_openvino.py)
        assert _rel(q_ov, ref) <= 1.5 * floor + 1e-6

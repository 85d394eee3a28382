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
from ptq4vit.calib.calibrate import smoothing_factors
from ptq4vit.errors import UserError
from ptq4vit.nn import FloatMatMul, QuantLinear, QuantMatMul
from ptq4vit.presets import get_preset, parse_field

from test_export import MODELS, torch_out

IMAGES = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
_CACHE: dict = {}


def deploy(key="vit"):
    """A tiny model calibrated with deploy8 (the real search: it is fast at this size)."""
    if key not in _CACHE:
        name, kw = MODELS[key]
        torch.manual_seed(0)
        m = timm.create_model(name, pretrained=False, **kw).eval()
        _CACHE[key] = (m, ptq4vit.quantize(m, IMAGES, "deploy8", 8, 8, progress=False, threads=1))
    return _CACHE[key]


def test_new_preset_fields_are_typed_and_checked():
    assert get_preset("deploy8").quantize_attention is False and get_preset("ptq4vit").quantize_attention is True
    assert parse_field("quantize_attention", "off") is False
    assert parse_field("smooth_alpha", "0.25") == 0.25
    with pytest.raises(UserError, match="smooth_alpha must be in"):
        get_preset("deploy8", smooth_alpha=1.5)
    with pytest.raises(UserError, match="quantize_attention must be True or False"):
        get_preset("deploy8", quantize_attention="no")
    with pytest.raises(UserError, match="preset field smooth_alpha must be float"):
        parse_field("smooth_alpha", "strong")


def test_smoothing_factors_on_hand_made_tensors():
    x = torch.tensor([[1.0, -4.0, 0.0, 2.0], [-9.0, 1.0, 0.0, 0.5]])
    w = torch.tensor([[1.0, 0.5, 3.0, 0.0], [-4.0, 2.0, 1.0, 0.0]])
    s = smoothing_factors(x, w, 0.5)
    # max|x| = 9, 4, 0, 2; max|W| per input column = 4, 2, 3, 0: sqrt(9/4), sqrt(4/2); zero channels keep 1
    assert torch.equal(s, torch.tensor([1.5, 2.0 ** 0.5, 1.0, 1.0]))
    assert torch.equal(smoothing_factors(x, w, 1.0)[:2], torch.tensor([9.0, 4.0]))


def test_only_linear_layers_are_sites_and_attention_stays_float():
    m, q = deploy("vit")
    sites = q.sites()
    assert not any(isinstance(s, QuantMatMul) for s in sites.values())
    floats = [n for n, mod in q.model.named_modules() if isinstance(mod, FloatMatMul)]
    assert floats == [f"blocks.{i}.attn.matmul{j}" for i in range(2) for j in (1, 2)]
    smoothed = sorted(n for n, s in sites.items() if isinstance(s, QuantLinear) and s.smooth is not None)
    assert smoothed == sorted(f"blocks.{i}.{p}" for i in range(2) for p in ("attn.qkv", "mlp.fc1", "mlp.fc2"))
    assert all(not torch.all(sites[n].smooth == 1) for n in smoothed)


def test_smoothing_keeps_the_float_function():
    """x / s times W diag(s) is x Wᵀ up to float rounding: with its quantizers off the smoothed
    model is the float model."""
    m, q = deploy("vit")
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
    from test_openvino import _rel, runtime_outputs_and_noise_floor
    _, q = deploy(key)
    ref, q_ort, q_ov, floor = runtime_outputs_and_noise_floor(q, tmp_path)
    assert _rel(q_ort, ref) <= 1.5 * floor + 1e-6
    assert _rel(q_ov, ref) <= 1.5 * floor + 1e-6

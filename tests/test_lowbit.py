"""Log-domain softmax quantizer, fidelity metrics, and checkpoints of rotated / GPTQ / log-quantized models."""
import math

import pytest
import torch

import ptq4vit
from ptq4vit import checkpoint as ck
from ptq4vit.harness.ablations import RECONSTRUCTION, RECONSTRUCTION_ABLATION_ROWS, ROTQ_ABLATION_ROWS
from ptq4vit.harness.fidelity import kl_per_image, mean_kl, top1_agreement
from ptq4vit.nn import QuantLinear
from ptq4vit.errors import UserError
from ptq4vit.quant import LogQuantizer, log_codes, log_fake_quant, renormalize_rows
from ptq4vit.transforms import OnlineRotation

from conftest import make_tiny, make_tiny_dinov2


def test_log2_codes_and_values_on_hand_made_values():
    x = torch.tensor([1.0, 0.6, 0.5, 0.3, 0.25, 0.01, 2.0 ** -6, 2.0 ** -7, 0.0])
    # 3 bits: codes 0..6 are 2^-c, code 7 is zero
    assert log_codes(x, 3, "log2").tolist() == [0, 1, 1, 2, 2, 7, 6, 7, 7]
    assert log_fake_quant(x, 3, "log2").tolist() == [1.0, 0.5, 0.5, 0.25, 0.25, 0.0, 2.0 ** -6, 0.0, 0.0]


def test_log_sqrt2_has_two_codes_per_halving():
    x = torch.tensor([1.0, 0.75, 0.5, 2.0 ** -3.5, 0.0])
    # -2·log2(0.75) = 0.83 -> 1; 0.5 -> 2; 2^-3.5 -> 7
    assert log_codes(x, 4, "log_sqrt2").tolist() == [0, 1, 2, 7, 15]
    got = log_fake_quant(x, 4, "log_sqrt2")
    want = torch.tensor([1.0, 2 ** -0.5, 0.5, 2 ** -3.5, 0.0])
    assert torch.equal(got, want)
    q = LogQuantizer(4, "log_sqrt2")
    assert torch.equal(q(x), want)  # nothing to calibrate
    with pytest.raises(ValueError, match="base"):
        LogQuantizer(4, "log3")


def test_fidelity_metrics_on_hand_made_logits():
    ref = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    out = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 1.0, 0.0]])
    assert top1_agreement(ref, out) == 50.0
    kl = kl_per_image(ref, out)
    assert kl[0] == 0 and kl[2] == 0
    p = torch.softmax(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), -1)
    q = torch.softmax(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), -1)
    want = float((p * (p / q).log()).sum())
    assert math.isclose(float(kl[1]), want, rel_tol=1e-12)
    assert math.isclose(mean_kl(ref, out), float(kl.mean()), rel_tol=1e-15)
    with pytest.raises(ValueError, match="logit"):
        top1_agreement(ref, out[:2])



def test_rotq_with_log_softmax_round_trips_through_a_checkpoint(tmp_path):
    m, x = make_tiny_dinov2(depth=1)
    q = ptq4vit.quantize(m, x, "rotq", 4, 4, progress=False, n_candidates=4, rounds=1, softmax_log="log_sqrt2")
    params = q.qparams()
    assert params["modules"]["blocks.0.attn.matmul2"]["a_log"] == "log_sqrt2"
    assert len(params["modules"]["blocks.0.attn.qkv"]["w_scale"]) == 3 * 96   # per channel
    assert isinstance(q.model.blocks[0].mlp.norm, OnlineRotation)
    ck.save(q, tmp_path / "q.safetensors")
    q2 = ptq4vit.load(tmp_path / "q.safetensors")
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))
    assert q2.qparams() == params


def test_rotq_ablation_rows_are_valid_presets():
    for label, overrides in ROTQ_ABLATION_ROWS.items():
        p = ptq4vit.get_preset("rotq", **overrides)
        assert p.overrides() == overrides, label


def test_reconstruction_ablation_rows_change_one_switch_each():
    import dataclasses
    from ptq4vit.harness.report import variant_name
    learned = ptq4vit.get_recipe("rotq", **RECONSTRUCTION).reconstruction
    for label, overrides in RECONSTRUCTION_ABLATION_ROWS.items():
        r = ptq4vit.get_recipe("rotq", **RECONSTRUCTION, **overrides).reconstruction
        changed = [f.name for f in dataclasses.fields(r) if getattr(r, f.name) != getattr(learned, f.name)]
        assert changed == [k.split(".")[1] for k in overrides], label
        assert variant_name("rotq", {**RECONSTRUCTION, **overrides}) == f"reconstruction, {label}"


def test_rotated_gptq_model_exports_to_integer_onnx_and_log_softmax_is_listed_as_float(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from ptq4vit.export import export_onnx
    from ptq4vit.export.bench import compare_outputs
    from ptq4vit.export.ort import make_session

    m, x = make_tiny_dinov2(depth=1)
    q = ptq4vit.quantize(m, x, "rotq", 8, 8, progress=False, n_candidates=4, rounds=1, softmax_log="log2",
                         softmax_renorm=False)  # (renormalized rows are a float fallback of their own)
    rep = export_onnx(q, tmp_path / "m.onnx")
    # integer everywhere but the float-image patch embedding and the log-quantized softmax operand
    assert sorted(s.name for s in rep.fallbacks) == ["blocks.0.attn.matmul2", "patch_embed.proj"]
    assert "LogQuantizer" in [s for s in rep.fallbacks if s.name == "blocks.0.attn.matmul2"][0].reason
    # fc2's online input rotation has no integer lowering: listed as a float part, in the file's metadata too
    assert [t.name for t in rep.float_transforms] == ["blocks.0.mlp.norm"]
    assert ("  float transform: blocks.0.mlp.norm: online rotation (3 x 128), float MatMuls (no integer lowering)"
            in rep.summary().splitlines())
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert meta["ptq4vit.float_transforms"] == "blocks.0.mlp.norm: online rotation (3 x 128), float MatMuls"
    with torch.no_grad():
        ref = q(x).numpy()
    out = make_session(str(tmp_path / "m.onnx")).run(None, {"input": x.numpy()})[0]
    c = compare_outputs(ref, out)
    assert c["max_abs_logit_error"] <= 0.05 * c["max_abs_logit"]


def test_export_summary_groups_float_transforms_by_kind():
    from ptq4vit.export import ExportReport, FloatTransform

    rep = ExportReport("m.onnx", True, "portable", "gemm", 17, ("batch", 3, 28, 28))
    rep.float_transforms = [FloatTransform("blocks.0.mlp.norm", "online rotation (3 x 128)"),
                            FloatTransform("blocks.1.mlp.norm", "online rotation (3 x 128)"),
                            FloatTransform("blocks.1.x", "other")]
    assert rep.summary().splitlines()[2:] == [
        "  float transforms, 2 x online rotation (3 x 128) (no integer lowering): blocks.0.mlp.norm, blocks.1.mlp.norm",
        "  float transform: blocks.1.x: other (no integer lowering)"]


def _bits_of(q):
    """(weight bits, input bits) of every linear site."""
    return {n: (s.w_quant.bits, s.a_quant.bits) for n, s in q.sites().items() if isinstance(s, QuantLinear)}


@pytest.mark.parametrize("kind", ["deit_distilled", "swin"])
def test_head_bits_set_the_classifier_heads_alone(kind, tmp_path):
    model, images = make_tiny(kind)
    q = ptq4vit.quantize(model, images, "ptq4vit", 4, 4, progress=False, n_candidates=4, rounds=1, head_bits=8)
    heads = {"deit_distilled": {"head", "head_dist"}, "swin": {"head.fc"}}[kind]
    bits = _bits_of(q)
    assert {n for n, b in bits.items() if b == (8, 8)} == heads
    assert all(b == (4, 4) for n, b in bits.items() if n not in heads)
    ck.save(q, tmp_path / "q.safetensors")
    q2 = ptq4vit.load(tmp_path / "q.safetensors")
    assert _bits_of(q2) == bits
    with torch.no_grad():
        assert torch.equal(q(images), q2(images))


def test_head_bits_export_to_integer_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from ptq4vit.export import export_onnx
    from ptq4vit.export.bench import compare_outputs
    from ptq4vit.export.ort import make_session

    m, x = make_tiny_dinov2(depth=1)
    q = ptq4vit.quantize(m, x, "ptq4vit", 6, 6, progress=False, n_candidates=4, rounds=1, head_bits=8)
    rep = export_onnx(q, tmp_path / "m.onnx")
    assert [s.name for s in rep.fallbacks] == ["patch_embed.proj"]
    head = [s for s in rep.sites if s.name == "head"][0]
    assert head.integer
    with torch.no_grad():
        ref = q(x).numpy()
    c = compare_outputs(ref, make_session(str(tmp_path / "m.onnx")).run(None, {"input": x.numpy()})[0])
    assert c["max_abs_logit_error"] <= 0.05 * c["max_abs_logit"]


@pytest.mark.parametrize("bad, message", [(1, "head_bits must be 0"), (9, "head_bits must be 0"),
                                          (2.5, "head_bits must be an int"), ("8", "head_bits must be an int")])
def test_head_bits_outside_2_to_8_are_refused(bad, message):
    with pytest.raises(ptq4vit.errors.UserError, match=message):
        ptq4vit.get_preset("rotq", head_bits=bad)


def test_renormalize_rows_on_hand_made_rows():
    x = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.3, 0.3]])
    q = torch.tensor([[0.5, 0.25, 0.0], [0.0, 0.0, 0.0]])   # the second row lost all its mass
    out = renormalize_rows(q, x)
    assert torch.allclose(out, torch.tensor([[2 / 3, 1 / 3, 0.0], [0.0, 0.0, 0.0]]), rtol=0, atol=1e-7)
    # a stack of candidates (leading dim) against one operand, in half precision
    stacked = renormalize_rows(torch.stack([q, 2 * q]).half(), x)
    assert stacked.dtype == torch.float16
    assert torch.allclose(stacked[1].float(), out, atol=1e-3)


def test_softmax_renorm_keeps_row_mass_in_the_model_round_trips_and_exports_as_float(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from ptq4vit.export import export_onnx
    from ptq4vit.export.bench import compare_outputs
    from ptq4vit.export.ort import make_session

    m, x = make_tiny_dinov2(depth=1)
    q = ptq4vit.quantize(m, x, "rotq", 4, 4, progress=False, n_candidates=4, rounds=1, softmax_renorm=True)
    mm = q.model.blocks[0].attn.matmul2
    assert mm.renorm_rows
    seen = {}
    mm.register_forward_hook(lambda mod, args, out: seen.update(a=args[0], b=args[1], out=out))
    with torch.no_grad():
        out = q(x)
        quantized = renormalize_rows(mm.a_quant(seen["a"]), seen["a"])
        assert (mm.a_quant(seen["a"]).sum(-1) - 1).abs().max() > 1e-3                 # rounding removed mass ...
        assert (quantized.sum(-1) - 1).abs().max() < 1e-5                              # ... that renorm restores
        assert torch.equal(seen["out"], quantized @ mm.b_quant(seen["b"]))            # and the layer computes
    ck.save(q, tmp_path / "q.safetensors")
    q2 = ptq4vit.load(tmp_path / "q.safetensors")
    assert q2.model.blocks[0].attn.matmul2.renorm_rows
    with torch.no_grad():
        assert torch.equal(out, q2(x))
    rep = export_onnx(q, tmp_path / "m.onnx")
    reason = [s for s in rep.fallbacks if s.name == "blocks.0.attn.matmul2"][0].reason
    assert "softmax_renorm" in reason
    c = compare_outputs(out.numpy(), make_session(str(tmp_path / "m.onnx")).run(None, {"input": x.numpy()})[0])
    assert c["max_abs_logit_error"] <= 0.05 * c["max_abs_logit"]


def test_softmax_renorm_needs_quantized_attention():
    with pytest.raises(UserError, match="override softmax_renorm=True would change nothing .*softmax.renorm does not apply"):
        ptq4vit.get_preset("deploy8", softmax_renorm=True)

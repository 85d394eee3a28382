"""The QDQ graph on OpenVINO: every quantized product runs as an integer layer, outputs agree
with the fake-quantized torch model as closely as float rounding differences allow."""
import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

from ptq4vit.errors import UserError  # noqa: E402
from ptq4vit.export import export_onnx  # noqa: E402
from ptq4vit.export.openvino import INTEGER_PRECISIONS, compile_onnx, executed_layers  # noqa: E402
from ptq4vit.export.ort import make_session  # noqa: E402

from _family_checks import OPENVINO_INT8_EXACT  # noqa: E402
from test_export import _saturating_site, _Wrap, quantized, saved_vit_and_images, torch_out  # noqa: E402


def _rel(a, ref):
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def runtime_outputs_and_noise_floor(q, tmp_path):
    """Export ``q`` as int8 QDQ and float, run both on 64 images; return the fake-quantized torch
    logits, the int8 logits of ONNX Runtime and OpenVINO (f32), and the noise floor: the largest
    relative change of the torch model under an input perturbation of relative size F, F being
    the float graphs' ORT/OpenVINO difference (asserted to be float rounding)."""
    export_onnx(q, tmp_path / "q.onnx", format="qdq")
    export_onnx(q, tmp_path / "f.onnx", int8=False)
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    xs = x.numpy()
    f_ort = make_session(str(tmp_path / "f.onnx")).run(None, {"input": xs})[0]
    f_ov = compile_onnx(tmp_path / "f.onnx", "f32").run(xs)
    F = _rel(f_ov, f_ort)
    assert 0 < F < 1e-5
    ref = torch_out(q, x)
    floor = max(_rel(torch_out(q, x * (1 + F * torch.randn(x.shape, generator=torch.Generator().manual_seed(s)))), ref)
                for s in range(4))
    q_ort = make_session(str(tmp_path / "q.onnx")).run(None, {"input": xs})[0]
    q_ov = compile_onnx(tmp_path / "q.onnx", "f32").run(xs)
    return ref, q_ort, q_ov, floor


@pytest.mark.parametrize("precision", ["f32", "default"])
def test_every_product_runs_in_integers(precision, tmp_path):
    _, q = quantized("vit")
    rep = export_onnx(q, tmp_path / "q.onnx", format="qdq")
    m = compile_onnx(tmp_path / "q.onnx", precision, threads=1)
    assert m.precision in ("f32", "bf16") and (precision != "f32" or m.precision == "f32")
    layers = executed_layers(m)
    products = sum(2 if "twin" in s.lowering else 1 for s in rep.sites if s.integer)
    integer = [lay for lay in layers if lay[1] in INTEGER_PRECISIONS]
    floats = [lay for lay in layers if lay[1] not in INTEGER_PRECISIONS]
    assert len(integer) == products, layers
    assert [lay[0] for lay in floats] == ["Convolution"]  # the patch embedding, a listed float fallback


@pytest.mark.parametrize("key", ["vit", "deit", "swin"])
def test_outputs_agree_as_closely_as_float_rounding_allows(key, tmp_path):
    """Tolerance, stated: at W8A8 a one-ulp difference in a float op (LayerNorm, softmax, GELU) can
    flip a code next to a rounding boundary and the flip cascades. F = the relative difference of
    the float graphs on ONNX Runtime and OpenVINO; the noise floor = the largest relative change of
    the fake-quantized torch model when its input is multiplied by 1 + F·N(0, 1) (4 draws). Each
    int8 runtime must stay within 1.5x that floor of the torch model (OpenVINO only on a CPU with
    VNNI: without it OpenVINO's products saturate, see the next test)."""
    _, q = quantized(key)
    ref, q_ort, q_ov, floor = runtime_outputs_and_noise_floor(q, tmp_path)
    assert _rel(q_ort, ref) <= 1.5 * floor + 1e-6
    if OPENVINO_INT8_EXACT:
        assert _rel(q_ov, ref) <= 1.5 * floor + 1e-6
        assert np.mean(q_ov.argmax(1) == ref.argmax(1)) >= 0.95


@pytest.mark.parametrize("asymmetric", [False, True])
def test_openvino_is_exact_on_a_saturating_product_only_with_vnni(asymmetric, tmp_path):
    """Full-range 8-bit codes times extreme int8 weights: exact on OpenVINO where the CPU has VNNI;
    without it OpenVINO's u8 x s8 kernel saturates int16 pair sums (what OpenVINO documents as its
    saturation issue), and compile_onnx says so in one warning and in ``int8_exact``."""
    import warnings
    mod, x = _saturating_site(asymmetric)
    export_onnx(_Wrap(mod), tmp_path / "s.onnx", input_size=(5, 64), format="qdq")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = compile_onnx(tmp_path / "s.onnx", "f32", threads=1)
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    exact = np.allclose(m.run(x.numpy()), torch_out(mod, x), rtol=1e-6)
    assert exact == OPENVINO_INT8_EXACT == m.int8_exact
    assert len(said) == (0 if OPENVINO_INT8_EXACT else 1) and all("no VNNI" in w and "s.onnx" in w for w in said)


def test_precision_is_checked(tmp_path):
    with pytest.raises(UserError, match="precision"):
        compile_onnx(tmp_path / "x.onnx", "int4")


def test_benchmark_times_and_scores_openvino_in_the_same_loop(tmp_path):
    from ptq4vit.export.bench import benchmark, format_bench
    _, q = quantized("vit")
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    labels = torch_out(q, x).argmax(1)
    res = benchmark(q, images=x, labels=labels, batch_sizes=(2,), providers=["CPUExecutionProvider"], threads=1,
                    repeats=2, warmup=1, workdir=str(tmp_path), include_torch=False, openvino="f32")
    assert {r["variant"] for r in res.timings} == {"float32-onnx", "int8-onnx", "float32-openvino", "int8-openvino"}
    assert res.openvino_precision == "f32"
    assert res.ratio("CPU", 2, runtime="openvino") is not None
    assert res.agreement["OpenVINO (f32)"]["n_images"] == 12
    assert set(res.accuracy) == {"fakequant-torch", "float32-onnx", "int8-onnx", "float32-openvino", "int8-openvino"}
    assert "OpenVINO speed ratio (f32 float layers, batch 2)" in format_bench(res)


def test_cli_qdq_export_and_openvino_bench_eval(tmp_path, capsys):
    import json

    from ptq4vit.harness.cli import main
    ckpt, data = saved_vit_and_images(tmp_path, 2)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "q.onnx"), "--format", "qdq",
                 "--check", "2"]) == 0
    assert "format=qdq" in capsys.readouterr().out
    assert main(["bench", "--checkpoint", str(ckpt), "--data-dir", str(data), "--batch-sizes", "1", "--repeats", "1",
                 "--threads", "1", "--providers", "cpu", "--no-torch", "--openvino", "f32",
                 "--json", str(tmp_path / "b.json")]) == 0
    assert "int8/float32 OpenVINO speed ratio (f32 float layers, batch 1)" in capsys.readouterr().out
    assert json.loads((tmp_path / "b.json").read_text())["openvino_precision"] == "f32"
    assert main(["eval", "--checkpoint", str(ckpt), "--data-dir", str(data), "--onnx", str(tmp_path / "q.onnx"),
                 "--openvino", "f32"]) == 0
    assert "(OpenVINO, float layers in f32): top-1" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(ckpt), "--data-dir", str(data), "--openvino", "f32"]) == 2
    assert "--onnx" in capsys.readouterr().err


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_per_head_matmul_site_below_8_bits_runs_as_on_onnx_runtime(bits, tmp_path):
    """``q @ kᵀ`` with per-head scales at 8, 6 and 4 bits: OpenVINO's codes are torch's (and ONNX
    Runtime's); below 8 bits the left operand's clamp to the code range must not sit between its
    division and its QuantizeLinear, which OpenVINO computes other codes for (0.24 relative at 4 bits)."""
    from test_export import _matmul_site, _Wrap
    mod, x = _matmul_site(bits, None)
    export_onnx(_Wrap(mod), tmp_path / "s.onnx", input_size=tuple(x.shape[1:]), format="qdq")
    ref = torch_out(mod, x)
    ov = compile_onnx(tmp_path / "s.onnx", "f32", threads=1).run(x.numpy())
    if bits < 8 or OPENVINO_INT8_EXACT:  # 8-bit codes span all 256 values: they saturate without VNNI
        np.testing.assert_allclose(ov, ref, rtol=0, atol=1e-5 * np.abs(ref).max())

"""ONNX export with integer semantics, checked against the fake-quantized torch model in ONNX Runtime."""
import os

import numpy as np
import pytest
import torch
import timm
from torch import nn

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import ptq4vit  # noqa: E402
from ptq4vit import checkpoint as ck  # noqa: E402
from ptq4vit.export import cpu_has_vnni, export_onnx  # noqa: E402
from ptq4vit.export.bench import benchmark, compare_outputs  # noqa: E402
from ptq4vit.export.ort import make_session, optimized_op_counts, profile_ops  # noqa: E402
from ptq4vit.nn import QuantLinear, QuantMatMul  # noqa: E402
from ptq4vit.presets import get_preset  # noqa: E402
from ptq4vit.quant import (AsymmetricQuantizer, TwinGeluQuantizer, TwinSoftmaxQuantizer, UniformQuantizer, qmax,  # noqa: E402
                          range_to_step)
from ptq4vit.quantized import QuantizedModel  # noqa: E402

from _fastq import fast_quantize  # noqa: E402  (scales from absolute maxima; the export must honour any scales)


def run_onnx(path, x):
    return make_session(str(path)).run(None, {"input": x.numpy()})[0]


def torch_out(model, x):
    with torch.no_grad():
        return model(x).numpy()


# ------------------------------------------------------------------ one site at a time: exact


class _Wrap(QuantizedModel):
    def __init__(self, module):
        super().__init__(module, get_preset("ptq4vit"), 8, 8, "site")


def _linear_site(bits, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) * 0.1)
    wq = UniformQuantizer(bits, 3, axis=0)
    wq.set_scale(lin.weight.detach().reshape(3, -1).abs().amax(1) / (qmax(bits) - 0.5) * 0.7)  # clipping: codes hit both ends
    if kind == "uniform":
        aq = UniformQuantizer(bits)
        aq.set_scale(torch.tensor([3.0 / qmax(bits)]))
        x = torch.randn(4, 10, 64, generator=g) * 2
    elif kind == "asymmetric":  # range [-1, 4] on the codes (zero point != 0): both ends clip
        aq = AsymmetricQuantizer(bits)
        aq.set_params(*range_to_step(torch.tensor([-1.0]), torch.tensor([4.0]), bits))
        x = torch.randn(4, 10, 64, generator=g) * 2 + 1.5
    else:
        aq = TwinGeluQuantizer(bits, pow2=True)
        aq.set_scale(aq.neg_scale * 16 if kind == "gelu-pow2" else aq.neg_scale * 13.7)
        x = nn.functional.gelu(torch.randn(4, 10, 64, generator=g) * 3)
    return nn.Sequential(QuantLinear(lin, wq, aq)), x


class _MatMulNet(nn.Module):
    def __init__(self, mm, softmax):
        super().__init__()
        self.mm, self.softmax = mm, softmax

    def forward(self, x):
        a, b = x[..., :20], x[..., 20:]
        if self.softmax:
            a = (a * 3).softmax(-1)
        return self.mm(a, b)


def _matmul_site(bits, form):
    heads = 3
    bq = UniformQuantizer(bits, heads, axis=1)
    bq.set_scale(torch.tensor([2.0, 3.0, 4.0]) / qmax(bits))
    if form is None:
        aq = UniformQuantizer(bits, heads, axis=1)
        aq.set_scale(torch.tensor([2.5, 3.5, 1.5]) / qmax(bits))
    else:  # "select-top": a top that clips the largest probabilities
        aq = TwinSoftmaxQuantizer(bits, form.split("-")[0], top=form.endswith("-top"))
        aq.set_split(torch.tensor(2.0 ** -3))
        if aq.has_top:
            aq.set_top(torch.tensor(0.3))
    x = torch.randn(2, heads, 20, 40, generator=torch.Generator().manual_seed(0)) * 2
    return _MatMulNet(QuantMatMul(aq, bq), form is not None), x


# (format, twin_combine): the contrib lowering with both combines, and the standard QDQ graph
FORMATS = [("contrib", "gemm"), ("contrib", "int32"), ("qdq", "gemm")]


@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("kind", ["uniform", "asymmetric", "gelu-pow2", "gelu-free"])
@pytest.mark.parametrize("fmt,combine", FORMATS)
def test_linear_site_is_exact(bits, kind, fmt, combine, tmp_path):
    mod, x = _linear_site(bits, kind)
    if combine == "int32" and kind == "gelu-free":
        with pytest.raises(ValueError, match="not a power of two"):
            export_onnx(_Wrap(mod), tmp_path / "s.onnx", input_size=tuple(x.shape[1:]), twin_combine=combine)
        return
    rep = export_onnx(_Wrap(mod), tmp_path / "s.onnx", input_size=tuple(x.shape[1:]), twin_combine=combine, format=fmt)
    assert rep.sites[0].integer
    ref, out = torch_out(mod, x), run_onnx(tmp_path / "s.onnx", x)
    # integer products are exact; only the float scaling of the int32 sums rounds differently
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("bits", [8, 6])
@pytest.mark.parametrize("form", ["select", "sum", "select-top", None])
@pytest.mark.parametrize("fmt,combine", FORMATS)
def test_attention_matmul_site_is_exact(bits, form, fmt, combine, tmp_path):
    mod, x = _matmul_site(bits, form)
    rep = export_onnx(_Wrap(mod), tmp_path / "s.onnx", input_size=tuple(x.shape[1:]), twin_combine=combine, format=fmt)
    assert rep.sites[0].integer
    ref, out = torch_out(mod, x), run_onnx(tmp_path / "s.onnx", x)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


class _BoundaryNet(nn.Module):
    """softmax @ v on given probabilities: features :20 are the probabilities (20 tokens), the first
    20 rows of features 20: are v."""
    def __init__(self, mm):
        super().__init__()
        self.mm = mm

    def forward(self, x):
        return self.mm(x[..., :20], x[:, :, :20, 20:])


@pytest.mark.parametrize("form", ["select", "sum", "select-top"])
@pytest.mark.parametrize("fmt", ["contrib", "qdq"])
def test_softmax_twin_codes_match_torch_at_half_boundaries(form, fmt, tmp_path):
    """Probabilities within 8 ulps of every .5 boundary of both twin branches (and of the top and the
    regions' meeting point, with a top): the graph's codes are the torch model's (a single flipped
    code would move an output by Δ_R·|v|, far above 1e-6)."""
    bits, split = 8, torch.tensor(2.0 ** -2)
    top = 0.6 if form == "select-top" else 1.0
    levels = qmax(bits) - 1
    edges = torch.cat([(torch.arange(levels, dtype=torch.float64) + 0.5) * top / levels,          # hi branch
                       (torch.arange(levels, dtype=torch.float64) + 0.5) * 0.25 * top / levels,  # lo branch
                       torch.tensor([top, 0.25 * top, 0.9], dtype=torch.float64)])
    x = edges.float()
    vals, up, down = [x], x.clone(), x.clone()
    for _ in range(8):
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-1.0))
        vals += [up, down]
    a = torch.cat(vals)
    a = torch.cat([a, a.new_zeros((-len(a)) % 20)]).reshape(1, 1, -1, 20).clamp(0, 1)
    x = torch.cat([a, torch.randn(1, 1, a.shape[2], 8, generator=torch.Generator().manual_seed(0))], -1)
    aq = TwinSoftmaxQuantizer(bits, form.split("-")[0], top=form.endswith("-top"))
    aq.set_split(split)
    if aq.has_top:
        aq.set_top(torch.tensor(top))
    bq = UniformQuantizer(bits)
    bq.set_scale(torch.tensor([3.0 / 128]))
    mod = _BoundaryNet(QuantMatMul(aq, bq))
    export_onnx(_Wrap(mod), tmp_path / "b.onnx", input_size=tuple(x.shape[1:]), format=fmt)
    ref, out = torch_out(mod, x), run_onnx(tmp_path / "b.onnx", x)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("form", ["select", "sum"])
def test_softmax_twin_shift_in_gemm_scale_equals_int32_shift(form, tmp_path):
    mod, x = _matmul_site(8, form)
    export_onnx(_Wrap(mod), tmp_path / "g.onnx", input_size=tuple(x.shape[1:]), twin_combine="gemm")
    export_onnx(_Wrap(mod), tmp_path / "i.onnx", input_size=tuple(x.shape[1:]), twin_combine="int32")
    np.testing.assert_array_equal(run_onnx(tmp_path / "g.onnx", x), run_onnx(tmp_path / "i.onnx", x))


def _saturating_site(asymmetric: bool = False):
    """Full-range 8-bit codes times extreme int8 weights: ORT's AVX2 u8 x s8 kernel saturates int16
    pair sums here (codes 127, uint8 255 with zero point 128, times weight codes 127; asymmetric:
    step 1/255, zero point -128, so the uint8 codes are 255 with zero point 0)."""
    lin = nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    wq = UniformQuantizer(8)
    wq.set_scale(torch.tensor([1.0 / 127]))
    if asymmetric:
        aq = AsymmetricQuantizer(8)
        aq.set_params(torch.tensor([1.0 / 255]), torch.tensor([-128.0]))
    else:
        aq = UniformQuantizer(8)
        aq.set_scale(torch.tensor([1.0 / 127]))
    return nn.Sequential(QuantLinear(lin, wq, aq)), torch.ones(2, 5, 64)


@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("fmt,gemm", [("contrib", "portable"), ("contrib", "vnni"), ("qdq", "portable")])
def test_every_file_is_exact_on_this_cpu_where_u8s8_saturates(fmt, gemm, asymmetric, tmp_path):
    """make_session picks the operand types for the CPU that loads the file: a file exported for
    VNNI (u8 x s8) or as standard QDQ stays exact on an AVX2-only CPU (u8 x u8 there)."""
    mod, x = _saturating_site(asymmetric)
    rep = export_onnx(_Wrap(mod), tmp_path / "p.onnx", input_size=(5, 64), gemm=gemm, format=fmt)
    if fmt == "contrib":
        assert ("u8 x u8" if gemm == "portable" else "u8 x s8") in rep.sites[0].lowering
    np.testing.assert_allclose(run_onnx(tmp_path / "p.onnx", x), torch_out(mod, x), rtol=1e-6)
    avx2 = make_session(str(tmp_path / "p.onnx"), vnni=False).run(None, {"input": x.numpy()})[0]  # as an AVX2 CPU loads it
    np.testing.assert_allclose(avx2, torch_out(mod, x), rtol=1e-6)
    raw = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    out = raw.run(None, {"input": x.numpy()})[0]
    if not cpu_has_vnni() and (fmt, gemm) != ("contrib", "portable"):  # why the load-time choice exists
        assert not np.allclose(out, torch_out(mod, x), rtol=1e-3)


@pytest.mark.parametrize("fmt,gemm", [("contrib", "vnni"), ("contrib", "portable"), ("qdq", "portable")])
def test_load_time_operand_types_keep_every_integer(fmt, gemm, tmp_path):
    """Rewriting for a CPU with or without VNNI changes the full-range products only (7 linear
    layers and 2 q @ kᵀ in this ViT; twins stay), keeps them fused, and changes no output bit where
    this CPU computes both exactly (u8 x s8 saturates without VNNI: there the u8 x u8 rewrite must
    give what the portable file gives unrewritten)."""
    import onnx
    from ptq4vit.export.kernels import adapt_for_cpu
    _, q = quantized("vit")
    path = tmp_path / "m.onnx"
    export_onnx(q, path, format=fmt, gemm=gemm)
    expected = {("contrib", "vnni"): (0, 9), ("contrib", "portable"): (7, 0), ("qdq", "portable"): (0, 9)}[(fmt, gemm)]
    assert tuple(adapt_for_cpu(onnx.load(str(path)), v) for v in (True, False)) == expected
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(6)).numpy()
    outs = [make_session(str(path), vnni=v).run(None, {"input": x})[0] for v in (True, False)]
    if cpu_has_vnni():
        np.testing.assert_array_equal(outs[0], outs[1])
    elif fmt == "contrib":
        export_onnx(q, tmp_path / "portable.onnx", format=fmt, gemm="portable")
        raw = ort.InferenceSession(str(tmp_path / "portable.onnx"), providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(outs[1], raw.run(None, {"input": x})[0])
    model = onnx.load(str(path))
    adapt_for_cpu(model, False)
    onnx.save(model, str(tmp_path / "avx2.onnx"))
    assert optimized_op_counts(str(tmp_path / "avx2.onnx")).get("MatMulIntegerToFloat") == 17


# ------------------------------------------------------------------ whole models

MODELS = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, num_classes=10)),
    "deit": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, depth=1, num_classes=10)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, depths=(1, 1), num_heads=(2, 4), window_size=4,
                                                  embed_dim=32, num_classes=10)),
}


def quantized(key, preset="ptq4vit", bits=8, seed=0):
    name, kw = MODELS[key]
    torch.manual_seed(seed)
    m = timm.create_model(name, pretrained=False, **kw).eval()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return m, fast_quantize(m, x, preset, bits, bits)


#: Largest |ONNX - torch| logit difference relative to the largest |logit|, as bounds about twice to three times
#: what benchmarks/tolerance_figures.py printed for the same set-ups (2026-11-30, figures in the comments).
#: Most images agree to float rounding (median 1.8e-7); on a few, ONNX Runtime's float ops (LayerNorm, softmax,
#: GELU) land a value on the other side of a rounding or twin-region boundary, and the flipped code carries
#: through the later layers. The twin set-ups have more boundaries: benchmarks/tolerance_figures.py printed
#: flipped codes in 58 of 256 images for ptq4vit W8A8 and 9 for base W6A6; the inputs below hit none for the
#: float-rounding rows. Whether an input flips a code depends on the CPU's float kernels (AVX-512 or AVX2):
#: the twin set-ups are bounded for a flip everywhere.
REL_LOGIT_BOUND = {
    ("vit", "ptq4vit", 8): 0.03,      # measured 0.0158
    ("deit", "official", 8): 0.03,    # measured 0.0136
    ("swin", "ptq4vit", 8): 0.006,    # measured 1.7e-7 on Intel Xeon (no flip), 0.00247 on AMD EPYC (one flip)
    ("vit", "base", 6): 1e-6,         # measured 3.2e-7
    ("swin", "official", 6): 5e-7,    # measured 1.65e-7
    "vit, fc2 input float": 0.02,     # measured 0.0093
}
#: Top-1 agreement in % where the twin rounding differs: 100 measured with timm 1.0.31's random init, 96.9 (one
#: flip in 32) with timm 1.0.3's init of the same configuration; images whose top-2 logits nearly tie may flip.
TWIN_TOP1_BOUND = 93.75


def test_vit_export_agrees_and_runs_integer_kernels(tmp_path):
    _, q = quantized("vit")
    path = tmp_path / "vit.onnx"
    rep = export_onnx(q, path)
    # every site but the patch embedding (float image input, docs/method.md §1) runs in integers
    assert [s.name for s in rep.fallbacks] == ["patch_embed.proj"]
    assert sum(s.integer for s in rep.sites) == len(rep.sites) - 1
    assert "patch_embed.proj" in rep.summary()
    assert rep.float_transforms == [] and "float transform" not in rep.summary()
    ops = optimized_op_counts(str(path))
    # 2 blocks: qkv, proj, fc1, 2 x fc2 twin, q@k, 2 x softmax twin; + head
    assert ops.get("MatMulIntegerToFloat", 0) == 2 * 8 + 1
    assert "MatMul" not in ops and "Gemm" not in ops and "FusedMatMul" not in ops
    prof = profile_ops(str(path), (3, 32, 32), 2, runs=1)
    assert prof["ops"].get("MatMulIntegerToFloat", 0) > 0
    assert prof["providers"]["MatMulIntegerToFloat"] == ["CPUExecutionProvider"]
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    c = compare_outputs(torch_out(q, x), run_onnx(path, x))
    assert c["top1_agreement"] >= TWIN_TOP1_BOUND
    assert c["max_abs_logit_error"] <= REL_LOGIT_BOUND["vit", "ptq4vit", 8] * c["max_abs_logit"]


@pytest.mark.parametrize("key", ["vit", "swin"])
def test_qdq_export_fuses_every_product_into_integer_kernels(key, tmp_path):
    """The standard QDQ graph: ONNX Runtime fuses each DequantizeLinear -> MatMul into an integer
    GEMM (no float MatMul, Gemm or DequantizeLinear left in the graph it runs), its profiler
    shows them running, and the outputs equal the contrib graph's."""
    _, q = quantized(key)
    rep = export_onnx(q, tmp_path / "q.onnx", format="qdq")
    assert [s.name for s in rep.fallbacks] == ["patch_embed.proj"]
    import onnx
    g = onnx.load(str(tmp_path / "q.onnx")).graph
    assert all(n.domain in ("", "ai.onnx") for n in g.node)  # standard operators only
    products = sum(2 if "twin" in s.lowering else 1 for s in rep.sites if s.integer)
    ops = optimized_op_counts(str(tmp_path / "q.onnx"))
    assert ops.get("MatMulIntegerToFloat", 0) == products
    assert not {"MatMul", "Gemm", "FusedMatMul", "DequantizeLinear"} & set(ops)
    prof = profile_ops(str(tmp_path / "q.onnx"), (3, 32, 32), 2, runs=1)
    assert prof["providers"]["MatMulIntegerToFloat"] == ["CPUExecutionProvider"]
    export_onnx(q, tmp_path / "c.onnx", gemm="vnni")
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    if cpu_has_vnni():  # both graphs then run the same u8 x s8 products
        np.testing.assert_allclose(run_onnx(tmp_path / "q.onnx", x), run_onnx(tmp_path / "c.onnx", x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", ["contrib", "qdq"])
def test_float_attention_keeps_the_attention_matmuls_float(fmt, tmp_path):
    _, q = quantized("vit")
    rep = export_onnx(q, tmp_path / "fa.onnx", format=fmt, float_attention=True)
    attn = [n for n, m in q.sites().items() if isinstance(m, QuantMatMul)]
    assert sorted(s.name for s in rep.fallbacks) == sorted(attn + ["patch_embed.proj"])
    assert all("float_attention" in s.reason for s in rep.fallbacks if s.name in attn)
    assert optimized_op_counts(str(tmp_path / "fa.onnx")).get("MatMulIntegerToFloat") == 2 * 5 + 1  # linears, fc2 twice
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for n in attn:  # the torch model the graph now computes
        q.sites()[n].a_quant.enabled = q.sites()[n].b_quant.enabled = False
    try:
        c = compare_outputs(torch_out(q, x), run_onnx(tmp_path / "fa.onnx", x))
    finally:
        for n in attn:
            q.sites()[n].a_quant.enabled = q.sites()[n].b_quant.enabled = True
    assert c["max_abs_logit_error"] <= 0.05 * c["max_abs_logit"]


def test_qdq_refuses_int32_combine(tmp_path):
    _, q = quantized("vit")
    with pytest.raises(ptq4vit.errors.UserError, match="int32"):
        export_onnx(q, tmp_path / "q.onnx", format="qdq", twin_combine="int32")
    with pytest.raises(ptq4vit.errors.UserError, match="format must be one of"):
        export_onnx(q, tmp_path / "q.onnx", format="tflite")


@pytest.mark.parametrize("key,preset,bits", [("deit", "official", 8), ("swin", "ptq4vit", 8), ("vit", "base", 6),
                                             ("swin", "official", 6)])
def test_other_models_and_presets(key, preset, bits, tmp_path):
    _, q = quantized(key, preset, bits)
    path = tmp_path / "m.onnx"
    rep = export_onnx(q, path)
    assert [s.name for s in rep.fallbacks] == ["patch_embed.proj"]
    if preset == "official":  # hi+lo softmax twin and free Δ+: exact integer rewrites, listed as such
        assert any("(sum)" in s.lowering for s in rep.sites)
        assert any("free" in s.lowering for s in rep.sites)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    c = compare_outputs(torch_out(q, x), run_onnx(path, x))
    # float-rounding agreement (error ~1e-7 of the logits) leaves no flips; the twin-rounding difference may
    assert c["top1_agreement"] >= (TWIN_TOP1_BOUND if REL_LOGIT_BOUND[key, preset, bits] > 1e-3 else 100.0)
    assert c["max_abs_logit_error"] <= REL_LOGIT_BOUND[key, preset, bits] * c["max_abs_logit"]


def test_dynamic_and_fixed_batch(tmp_path):
    _, q = quantized("vit")
    export_onnx(q, tmp_path / "dyn.onnx")
    sess = make_session(str(tmp_path / "dyn.onnx"))
    for b in (1, 3):
        assert sess.run(None, {"input": np.zeros((b, 3, 32, 32), np.float32)})[0].shape == (b, 10)
    rep = export_onnx(q, tmp_path / "fixed.onnx", batch_size=2)
    assert rep.input_shape == (2, 3, 32, 32)


def test_float_export_and_disabled_site_fallback(tmp_path):
    m, q = quantized("vit")
    export_onnx(q, tmp_path / "f.onnx", int8=False)
    x = torch.randn(4, 3, 32, 32)
    with q.quantization_disabled():
        ref = torch_out(q, x)
    np.testing.assert_allclose(run_onnx(tmp_path / "f.onnx", x), ref, atol=1e-4)
    q.model.blocks[0].mlp.fc2.a_quant.enabled = False
    try:
        rep = export_onnx(q, tmp_path / "part.onnx")
        fb = {s.name: s.reason for s in rep.fallbacks}
        assert "blocks.0.mlp.fc2" in fb and "disabled" in fb["blocks.0.mlp.fc2"]
        c = compare_outputs(torch_out(q, x), run_onnx(tmp_path / "part.onnx", x))
        assert c["max_abs_logit_error"] <= REL_LOGIT_BOUND["vit, fc2 input float"] * c["max_abs_logit"]
    finally:
        q.model.blocks[0].mlp.fc2.a_quant.enabled = True


def test_checkpoint_to_onnx(tmp_path):
    _, q = quantized("deit")
    ck.save(q, tmp_path / "q.safetensors")
    q2 = ptq4vit.load(tmp_path / "q.safetensors")
    export_onnx(q, tmp_path / "a.onnx")
    export_onnx(q2, tmp_path / "b.onnx")
    x = torch.randn(4, 3, 32, 32)
    np.testing.assert_array_equal(run_onnx(tmp_path / "a.onnx", x), run_onnx(tmp_path / "b.onnx", x))


def test_benchmark_reports_speed_accuracy_agreement(tmp_path):
    _, q = quantized("vit")
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    labels = torch_out(q, x).argmax(1)
    labels[::4] = (labels[::4] + 1) % 10  # 3 of the 12 labels are not the model's prediction: 75% top-1
    res = benchmark(q, images=x, labels=labels, batch_sizes=(1, 2), providers=["CPUExecutionProvider"], threads=1,
                    repeats=2, warmup=1, workdir=str(tmp_path))
    variants = {(r["batch"], r["variant"]) for r in res.timings}
    assert variants == {(b, v) for b in (1, 2) for v in ("float32-onnx", "int8-onnx", "fakequant-torch")}
    t = {r["variant"]: r["median_ms"] for r in res.timings if r["batch"] == 2}
    assert res.ratio("CPUExecutionProvider", 2) == t["float32-onnx"] / t["int8-onnx"]
    assert res.accuracy["fakequant-torch"] == 75.0
    assert set(res.accuracy) == {"fakequant-torch", "float32-onnx", "int8-onnx"}
    assert res.agreement["CPUExecutionProvider"]["n_images"] == 12
    assert os.path.exists(res.onnx_paths["int8-onnx"])


def saved_vit_and_images(tmp_path, per_class: int):
    """A saved quantized tiny ViT checkpoint and an image folder of two classes, for the CLI tests."""
    from PIL import Image
    _, q = quantized("vit")
    ckpt = tmp_path / "q.safetensors"
    ck.save(q, ckpt, data_config={"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 1.0,
                                  "crop_mode": "squash", "mean": (0.5,) * 3, "std": (0.5,) * 3})
    data = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(data / c / f"{i}.png")
    return ckpt, data


def test_cli_export_bench_eval(tmp_path, capsys):
    from ptq4vit.harness.cli import main
    ckpt, data = saved_vit_and_images(tmp_path, 3)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "q.onnx"),
                 "--float-out", str(tmp_path / "f.onnx"), "--check", "4"]) == 0
    out = capsys.readouterr().out
    assert "float fallback: patch_embed.proj" in out and "MatMulIntegerToFloat" in out
    assert main(["bench", "--checkpoint", str(ckpt), "--data-dir", str(data), "--batch-sizes", "1",
                 "--repeats", "1", "--threads", "1", "--providers", "cpu", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "int8/float32 ONNX Runtime speed ratio" in out and "top-1 agreement" in out
    assert main(["eval", "--checkpoint", str(ckpt), "--data-dir", str(data)]) == 0
    torch_line = capsys.readouterr().out
    assert "top-1" in torch_line and "6 images" in torch_line
    assert main(["eval", "--checkpoint", str(ckpt), "--data-dir", str(data), "--onnx", str(tmp_path / "q.onnx")]) == 0
    assert "ONNX Runtime" in capsys.readouterr().out
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(ckpt.read_bytes()[:1000])
    assert main(["export", "--checkpoint", str(bad), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "truncated" in capsys.readouterr().err


# ------------------------------------------------------------------ input size and provenance


def _dynamic_vit():
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1, num_classes=10,
                          dynamic_img_size=True).eval()
    return fast_quantize(m, torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), "base", 8, 8)


def test_export_at_another_size_is_refused_by_a_fixed_size_model(tmp_path, capfd):
    _, q = quantized("vit")
    with pytest.raises(ptq4vit.UserError, match=r"takes 3x32x32 images and cannot be exported at 3x48x48"):
        export_onnx(q, tmp_path / "q.onnx", input_size=(3, 48, 48))
    with pytest.raises(ptq4vit.UserError, match=r"input_size must be \(C, H, W\) for this image model \(3x32x32\)"):
        export_onnx(q, tmp_path / "q.onnx", input_size=(48, 48))
    assert list(tmp_path.iterdir()) == []
    assert capfd.readouterr() == ("", "")


def test_dynamic_size_model_exports_at_another_size(tmp_path, capfd):
    q = _dynamic_vit()
    x = torch.randn(3, 3, 48, 40, generator=torch.Generator().manual_seed(2))
    rep = export_onnx(q, tmp_path / "q.onnx", input_size=(3, 48, 40))
    assert rep.input_shape == ("batch", 3, 48, 40)
    ref = torch_out(q, x)
    c = compare_outputs(ref, run_onnx(tmp_path / "q.onnx", x))
    assert c["top1_agreement"] == 100.0 and c["max_abs_logit_error"] <= REL_LOGIT_BOUND[("vit", "base", 6)] * c["max_abs_logit"]
    export_onnx(q, tmp_path / "f.onnx", int8=False, input_size=(3, 48, 40))
    with q.quantization_disabled():
        np.testing.assert_allclose(run_onnx(tmp_path / "f.onnx", x), torch_out(q, x), atol=1e-5)
    # the model is as it was: its own size still runs, and gives what it gave before the exports
    x32 = torch.randn(2, 3, 32, 32)
    assert q.model.pos_embed.shape[1] == 1 + 16 and q.model.patch_embed.grid_size == (4, 4)
    np.testing.assert_array_equal(torch_out(q, x32), torch_out(_dynamic_vit(), x32))
    assert capfd.readouterr() == ("", "")  # no TorchScript graph printed


def test_export_records_the_model_it_came_from(tmp_path):
    from ptq4vit.export.provenance import MODEL_DIGEST_KEY, check_exported_from, model_digest, read_onnx_metadata
    _, q = quantized("vit")
    _, other = quantized("vit", seed=1)
    ck.save(q, tmp_path / "q.safetensors")
    reloaded = ptq4vit.load(tmp_path / "q.safetensors")
    assert model_digest(reloaded) == model_digest(q) != model_digest(other)
    export_onnx(q, tmp_path / "q.onnx")
    export_onnx(q, tmp_path / "f.onnx", int8=False)
    for f in ("q.onnx", "f.onnx"):
        assert read_onnx_metadata(tmp_path / f)[MODEL_DIGEST_KEY] == model_digest(q)
        check_exported_from(tmp_path / f, reloaded, input_size=(3, 32, 32))
        with pytest.raises(ptq4vit.UserError, match=rf"{f} was exported from another model .* than the checkpoint"):
            check_exported_from(tmp_path / f, other, "the checkpoint")
    with pytest.raises(ptq4vit.UserError, match=r"q.onnx takes 3x32x32 images; the images here are 3x48x48"):
        check_exported_from(tmp_path / "q.onnx", q, input_size=(3, 48, 48))


def test_float_export_of_the_float_model_belongs_to_every_model_quantized_from_it(tmp_path):
    from ptq4vit.export.provenance import check_exported_from
    m, q = quantized("vit")
    other_float, other = quantized("vit", seed=1)
    ck.save(q, tmp_path / "q.safetensors")
    ck.save(other, tmp_path / "o.safetensors")
    reloaded, other = ptq4vit.load(tmp_path / "q.safetensors"), ptq4vit.load(tmp_path / "o.safetensors")
    export_onnx(m, tmp_path / "f.onnx", int8=False)
    check_exported_from(tmp_path / "f.onnx", reloaded, input_size=(3, 32, 32))
    mine, theirs = ck.float_weights_digest(m), ck.float_weights_digest(other_float)
    with pytest.raises(ptq4vit.UserError) as e:
        check_exported_from(tmp_path / "f.onnx", other, "the checkpoint")
    assert str(e.value) == (f"{tmp_path / 'f.onnx'} is the float32 graph of other float weights (sha256 {mine[:16]}...) "
                            f"than the checkpoint was quantized from ({theirs[:16]}...): export it again from that "
                            "float model")
    with pytest.raises(ptq4vit.UserError, match=r"f.onnx takes 3x32x32 images; the images here are 3x48x48"):
        check_exported_from(tmp_path / "f.onnx", reloaded, input_size=(3, 48, 48))


def test_failed_export_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    import ptq4vit.export.onnx as onnx_export
    _, q = quantized("vit")
    target = tmp_path / "q.onnx"
    target.write_bytes(b"previous export")

    def interrupted(*args, **kwargs):
        open(args[2], "wb").write(b"half a graph")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "_torch_export", interrupted)
    for int8 in (True, False):
        with pytest.raises(KeyboardInterrupt):
            export_onnx(q, target, int8=int8)
        assert [p.name for p in tmp_path.iterdir()] == ["q.onnx"] and target.read_bytes() == b"previous export"


def test_export_on_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    import errno
    _, q = quantized("vit")
    target = tmp_path / "q.onnx"
    target.write_bytes(b"previous export")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(ptq4vit.UserError, match=f"^cannot write ONNX file {target}: No space left on device$"):
        export_onnx(q, target, int8=False)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["q.onnx"] and target.read_bytes() == b"previous export"


def _one_line(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ptq4vit: error: "), err
    for n in needles:
        assert str(n) in err[0], err[0]


def test_cli_export_eval_bench_refuse_bad_paths_before_writing(tmp_path, capsys):
    from ptq4vit.harness.cli import main
    ckpt, data = saved_vit_and_images(tmp_path, 1)
    blocker = tmp_path / "somefile"
    blocker.write_text("x")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07 not a protobuf")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    export = ["export", "--checkpoint", str(ckpt), "--check", "0"]
    cases = [
        (export + ["--out", str(blocker / "q.onnx")], [blocker / "q.onnx", blocker, "not a folder"]),
        (export + ["--out", str(data)], [data, "is a folder"]),
        (export + ["--out", str(ckpt)], ["--checkpoint and --out name the same file"]),
        (export + ["--out", str(tmp_path / "q.onnx"), "--float-out", str(blocker / "f.onnx")], [blocker / "f.onnx"]),
        (["export", "--checkpoint", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "q.onnx")],
         ["checkpoint", tmp_path / "missing.safetensors", "does not exist"]),
        (["export", "--checkpoint", str(data), "--out", str(tmp_path / "q.onnx")], ["checkpoint", data, "not a file"]),
        (["eval", "--checkpoint", str(ckpt), "--data-dir", str(data), "--onnx", str(tmp_path / "missing.onnx")],
         ["--onnx file", tmp_path / "missing.onnx", "does not exist"]),
        (["eval", "--checkpoint", str(ckpt), "--data-dir", str(data), "--onnx", str(data)], ["--onnx file", "not a file"]),
        (["eval", "--checkpoint", str(ckpt), "--data-dir", str(data), "--onnx", str(garbage)],
         [garbage, "not a readable ONNX file"]),
        (["eval", "--checkpoint", str(ckpt), "--data-dir", str(tmp_path / "nodata")], [tmp_path / "nodata", "does not exist"]),
        (["bench", "--checkpoint", str(ckpt), "--json", str(blocker / "b.json")], ["--json file", blocker / "b.json"]),
        (["bench", "--checkpoint", str(ckpt), "--onnx-dir", str(blocker / "onnx")], ["--onnx-dir folder", blocker]),
        (["bench", "--checkpoint", str(ckpt), "--data-dir", str(blocker)], ["--data-dir folder", blocker, "not a folder"]),
    ]
    for argv, needles in cases:
        assert main(argv) == 2, argv
        _one_line(capsys, *needles)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_cli_eval_refuses_an_onnx_file_of_another_checkpoint(tmp_path, capsys):
    import onnx
    from ptq4vit.harness.cli import main
    ckpt, data = saved_vit_and_images(tmp_path, 1)
    _, other = quantized("vit", seed=1)
    ck.save(other, tmp_path / "other.safetensors")
    assert main(["export", "--checkpoint", str(tmp_path / "other.safetensors"), "--out", str(tmp_path / "other.onnx"),
                 "--float-out", str(tmp_path / "other_f.onnx"), "--check", "0"]) == 0
    capsys.readouterr()
    for f in ("other.onnx", "other_f.onnx"):
        assert main(["eval", "--checkpoint", str(ckpt), "--data-dir", str(data), "--onnx", str(tmp_path / f)]) == 2
        _one_line(capsys, tmp_path / f, "was exported from another model", f"than the checkpoint {ckpt}")
    assert main(["eval", "--checkpoint", str(tmp_path / "other.safetensors"), "--data-dir", str(data),
                 "--onnx", str(tmp_path / "other.onnx")]) == 0
    assert "ONNX Runtime" in capsys.readouterr().out
    # a file that records nothing (another tool, or an older ptq4vit): refused, with the way out
    m = onnx.load(str(tmp_path / "other.onnx"))
    del m.metadata_props[:]
    onnx.save(m, str(tmp_path / "bare.onnx"))
    assert main(["eval", "--checkpoint", str(tmp_path / "other.safetensors"), "--data-dir", str(data),
                 "--onnx", str(tmp_path / "bare.onnx")]) == 2
    _one_line(capsys, "does not record which model it was exported from", "ptq4vit export")

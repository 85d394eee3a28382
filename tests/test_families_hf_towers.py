"""Hugging Face transformers' CLIP and SigLIP vision towers: the five checks of a supported family at a tiny
size (float equivalence, calibration with each preset, checkpoint round trip, integer export on ONNX Runtime
and OpenVINO, the model names of the harness), which activations the post-GELU quantizers take, and the refusals."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed "
                                                          "(pip install 'ptq4vit[hf]')")

import ptq4vit  # noqa: E402
from ptq4vit import UnsupportedModelError  # noqa: E402
from ptq4vit.harness import zoo  # noqa: E402
from ptq4vit.models.hf_encoder import ACTIVATION_MINIMA, POST_GELU_FLOOR, fits_post_gelu_quantizers  # noqa: E402
from ptq4vit.quant.twin import GELU_NEG_RANGE, gelu_twin_fake_quant, gelu_twin_neg_step  # noqa: E402
from ptq4vit.transforms import RotationOptions  # noqa: E402

from _family_checks import (OPENVINO_INT8_EXACT, FAST, assert_checkpoint_round_trip, calibrate_at_w8a8_and_w4a4,  # noqa: E402
                            integer_products, max_abs, move_off_init, random_images, rotation_error,
                            run_on_onnx_runtime, run_on_openvino, switched_off, within)
from _fastq import fast_quantize  # noqa: E402

TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64)
#: model class -> (config class, extra config, output field, sites)
MODELS = {
    # patch conv + 2 layers x (qkv, matmul1, matmul2, out_proj, fc1, fc2)
    "CLIPVisionModel": ("CLIPVisionConfig", {}, "pooler_output", 13),
    "CLIPVisionModelWithProjection": ("CLIPVisionConfig", dict(projection_dim=24), "image_embeds", 14),
    # ... + the head's q, kv, matmul1, matmul2, out_proj, fc1, fc2
    "SiglipVisionModel": ("SiglipVisionConfig", {}, "pooler_output", 20),
}


def make(name, attn="eager", seed=0, **extra):
    config_cls, cfg, _, _ = MODELS[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**TINY, **cfg, **extra}, attn_implementation=attn)
    model = getattr(transformers, name)(config).eval()
    # nonzero norm affines and biases (transformers initialises them to 1 and 0)
    return move_off_init(model, 0.1, names=("norm", "bias"), generator=torch.Generator().manual_seed(seed + 1))


def images(n=8, seed=1):
    return random_images(n, seed)


def output(model, x):
    return getattr(model(x), MODELS[type(model).__name__][2])


# ---- 1. quantization off reproduces the original


@pytest.mark.parametrize("name", sorted(MODELS))
def test_quantization_off_reproduces_eager_attention_bit_for_bit(name):
    """SigLIP's pooling head runs nn.MultiheadAttention, which scales q before q @ kᵀ; the quantized head scales
    after it: by 1/sqrt(16), a power of two, so bit for bit here too."""
    _, got, ref = switched_off(make(name), images(), output=output)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_quantization_off_reproduces_sdpa_at_the_float_floor(name):
    """transformers' default attention is SDPA; the quantized attention computes the eager formula: measured at
    most 7.2e-7 with |outputs| up to 2.2."""
    model, x = make(name, attn="sdpa"), images()
    _, got, ref = switched_off(model, x, output=output)
    assert (got - ref).abs().max() <= 2e-6


# ---- 2. calibration with each preset


@pytest.mark.parametrize("name", ["CLIPVisionModelWithProjection", "SiglipVisionModel"])
@pytest.mark.parametrize("preset", ["ptq4vit", "deploy8"])
def test_presets_calibrate_at_w8a8_and_w4a4(name, preset):
    """CLIP's QuickGELU and SigLIP's tanh GELU (the configs' defaults) with ptq4vit's post-GELU twin."""
    model, x = make(name), images()
    assert type(model.encoder.layers[0].mlp.activation_fn if hasattr(model, "encoder") else
                model.vision_model.encoder.layers[0].mlp.activation_fn).__name__ in ("QuickGELUActivation", "GELUTanh")
    runs, err = calibrate_at_w8a8_and_w4a4(model, x, preset, max_abs, output, same_shape=True)
    for q, _ in runs.values():
        assert len(q.sites()) == MODELS[name][3] - (0 if q.preset.quantize_attention else
                                                    2 * (TINY["num_hidden_layers"] + (name == "SiglipVisionModel")))
    assert 0 < err[8] < err[4]


def test_sites_of_the_siglip_pooling_head():
    q = ptq4vit.quantize(make("SiglipVisionModel"), images(), "base", **FAST)
    assert [n for n in q.sites() if n.startswith("head.")] == [
        "head.q", "head.kv", "head.matmul1", "head.matmul2", "head.out_proj", "head.mlp.fc1", "head.mlp.fc2"]
    assert list(q.sites())[:2] == ["embeddings.patch_embedding", "encoder.layers.0.self_attn.qkv"]


# ---- which activations the post-GELU quantizers take


def test_activation_minima_are_the_activations_own():
    """Each tabled minimum is the activation's minimum over the reals (dense grid around it, float64)."""
    from transformers.activations import ACT2FN
    x = torch.linspace(-4, 0, 4_000_001, dtype=torch.float64)
    for act, cls in (("quick_gelu", "QuickGELUActivation"), ("gelu_pytorch_tanh", "GELUTanh"),
                     ("gelu_new", "NewGELUActivation")):
        assert type(ACT2FN[act]).__name__ == cls
        assert abs(float(ACT2FN[act](x).min()) - ACTIVATION_MINIMA[cls]) < 1e-8
    assert ACTIVATION_MINIMA["QuickGELUActivation"] > -GELU_NEG_RANGE  # inside GELU's negative range
    assert POST_GELU_FLOOR < ACTIVATION_MINIMA["GELUTanh"] < -GELU_NEG_RANGE  # below it by less than half a step


@pytest.mark.parametrize("act", ["quick_gelu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_the_post_gelu_twin_codes_these_activations_without_clipping(act, bits):
    """On the negative side every output is within half a step of its code (nothing clipped), as for GELU."""
    from transformers.activations import ACT2FN
    y = ACT2FN[act](torch.linspace(-6, 0, 200_001))
    neg = gelu_twin_neg_step(bits)
    assert fits_post_gelu_quantizers(ACT2FN[act])
    # half a step, plus float32 rounding of x / step at a tie
    assert (gelu_twin_fake_quant(y, torch.tensor(1.0), neg, bits) - y).abs().max() <= neg / 2 + 1e-8


def test_an_activation_outside_gelus_range_is_refused_with_the_twin():
    from transformers.activations import ACT2FN
    assert not fits_post_gelu_quantizers(ACT2FN["silu"])  # minimum -0.278
    model = make("CLIPVisionModel", hidden_act="silu")
    with pytest.raises(UnsupportedModelError, match=r"^module 'encoder.layers.0.mlp.activation_fn' of type "
                                                    r"SiLUActivation is not supported by the Hugging Face CLIP vision "
                                                    r"adapter: the post-GELU quantizers .* QuickGELU\); turn them off"):
        ptq4vit.quantize(model, images(), "ptq4vit", **FAST)
    ptq4vit.quantize(model, images(), "base", **FAST)  # uniform fc2 input: any activation


# ---- 3. checkpoint round trip


@pytest.mark.parametrize("name", sorted(MODELS))
def test_checkpoint_round_trip_is_bit_identical(name, tmp_path):
    model, x = make(name), images()
    meta = assert_checkpoint_round_trip(ptq4vit.quantize(model, x, "ptq4vit", 4, 4, **FAST), model, x, tmp_path)
    assert meta["model"]["name"] == name


# ---- 4. integer export on ONNX Runtime


@pytest.mark.parametrize("name", sorted(MODELS))
def test_integer_export_runs_on_onnxruntime(name, tmp_path):
    pytest.importorskip("onnxruntime")
    model, x = make(name), images()
    q = ptq4vit.quantize(model, x, "base", **FAST)
    sites = MODELS[name][3]
    with torch.no_grad():
        ref = q(x).numpy()
    for _, rep, out in run_on_onnx_runtime(q, x, tmp_path, input_size=(3, 32, 32)):
        assert (len(rep.sites), sum(s.integer for s in rep.sites)) == (sites, sites - 1)
        assert [s.name for s in rep.fallbacks] == [next(iter(q.sites()))]  # the patch conv: float image input
        assert out.shape == ref.shape and within(out, ref, 1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_integer_export_runs_on_openvino(name, tmp_path):
    """OpenVINO runs every integer product of the QDQ graph as one integer layer (the towers have no patch
    merging, which it splits): integer layers = integer products, twins counted twice."""
    pytest.importorskip("openvino")
    from ptq4vit.export import export_onnx

    model, x = make(name), images(4)
    q = fast_quantize(model, x)
    with torch.no_grad():
        ref = q(x).numpy()
    rep = export_onnx(q, tmp_path / "qdq.onnx", format="qdq", input_size=(3, 32, 32))
    assert sum(s.integer for s in rep.sites) == MODELS[name][3] - 1  # the patch conv: float image input
    out, integer = run_on_openvino(tmp_path / "qdq.onnx", x)
    if OPENVINO_INT8_EXACT:
        assert within(out, ref, 0.02)
    assert (integer_products(rep), integer) == OPENVINO_INTEGER_LAYERS[name]


#: (integer products of the QDQ graph, OpenVINO's integer layers) as measured: CLIP's 12 integer sites with
#: the twin ones (each fc2 and each softmax @ v) counting two, one more for the projection; SigLIP's 19 with
#: 6 twins (its pooling head's fc2 and softmax @ v included).
OPENVINO_INTEGER_LAYERS = {"CLIPVisionModel": (16, 16), "CLIPVisionModelWithProjection": (17, 17),
                           "SiglipVisionModel": (25, 25)}


# ---- refusals


def test_a_siglip_tower_without_its_head_is_refused_by_name():
    with pytest.raises(UnsupportedModelError, match=r"^module '<model>' of type SiglipVisionModel is not supported by "
                                                    r"the Hugging Face SigLIP vision adapter: vision_use_head=False "
                                                    r"returns the tokens"):
        ptq4vit.quantize(make("SiglipVisionModel", vision_use_head=False), images(), "base", **FAST)


def test_other_clip_and_siglip_classes_are_refused_by_name():
    config = transformers.CLIPConfig(vision_config=TINY, text_config=dict(hidden_size=32, num_hidden_layers=1,
                                                                          num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UnsupportedModelError, match="^model type CLIPForImageClassification is not supported"):
        ptq4vit.quantize(transformers.CLIPForImageClassification(config).eval(), images(), "base", **FAST)


# ---- rotations (rotq): CLIP's stream from pre_layrnorm to visual_projection, SigLIP's to the pool's k/v rows

ALL = RotationOptions(residual=True, heads=True, fc2=True)


@pytest.mark.parametrize("name, opts", [
    *[(n, o) for n in ("CLIPVisionModelWithProjection", "SiglipVisionModel")
      for o in (RotationOptions(residual=True), RotationOptions(heads=True), RotationOptions(fc2=True), ALL)],
    ("CLIPVisionModel", RotationOptions(heads=True, fc2=True))])
def test_rotated_tower_reproduces_the_float_model(name, opts):
    """Measured (eager attention): at most 2.1e-15 in float64 and 8.3e-7 in float32, with |outputs| 1.9 to 2.2."""
    for dtype, bound in ((torch.float64, 1e-14), (torch.float32, 2e-6)):
        assert rotation_error(make(name).to(dtype), images().to(dtype), opts, output) < bound


#: (sites, integer sites) of rotq's QDQ export: float are the patch conv (float image input) and every
#: softmax @ v (rotq's renormalized softmax rows have no integer lowering), the SigLIP pool's too.
ROTQ_EXPORT = {"CLIPVisionModelWithProjection": (14, 11), "SiglipVisionModel": (20, 16)}


@pytest.mark.parametrize("name", sorted(ROTQ_EXPORT))
def test_rotq_calibrates_at_w8a8_and_w4a4_round_trips_and_exports(name, tmp_path):
    model, x = make(name), images()
    runs, err = calibrate_at_w8a8_and_w4a4(model, x, "rotq", max_abs, output, same_shape=True)
    assert 0 < err[8] < err[4]
    q, y = runs[4]
    layer = q.model.get_submodule("vision_model.encoder.layers.0" if name.startswith("CLIP") else "encoder.layers.0")
    assert [type(layer.layer_norm1).__name__, type(layer.layer_norm2).__name__] == ["RMSNorm", "RMSNorm"]
    assert [type(m).__name__ for m in layer.mlp.activation_fn] == [
        "QuickGELUActivation" if name.startswith("CLIP") else "GELUTanh", "OnlineRotation"]
    if name.startswith("CLIP"):
        assert type(q.model.vision_model.pre_layrnorm).__name__ == "RotatedLayerNorm"
    # the W4A4 model: its checkpoint rebuilds the rotated structure
    assert_checkpoint_round_trip(q, model, x, tmp_path, want=y)
    pytest.importorskip("onnxruntime")
    from ptq4vit.export import export_onnx
    rep = export_onnx(q, tmp_path / "qdq.onnx", format="qdq", input_size=(3, 32, 32))
    assert (len(rep.sites), sum(s.integer for s in rep.sites)) == ROTQ_EXPORT[name]


def test_residual_rotation_of_clip_vision_model_is_refused_by_name():
    """CLIPVisionModel returns the normed class token: the last rotation would have no Linear to fold into; the
    per-head and fc2 rotations still apply (rotq with rotate_residual off)."""
    model, x = make("CLIPVisionModel"), images()
    with pytest.raises(UnsupportedModelError, match=r"^model CLIPVisionModel has no projection to fold the last "
                                                    r"residual rotation into: its features \(the normed class token\) "
                                                    r"would come out rotated$"):
        ptq4vit.quantize(model, x, "rotq", 6, 6, progress=False)
    q = ptq4vit.quantize(model, x, "rotq", 8, 8, rotate_residual=False, **FAST)
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()


def test_rotation_of_a_siglip_tower_without_its_head_is_refused_by_name():
    with pytest.raises(UnsupportedModelError, match=r"^module '<model>': vision_use_head=False returns the tokens"):
        ptq4vit.quantize(make("SiglipVisionModel", vision_use_head=False), images(), "rotq", 6, 6, progress=False)


# ---- 5. model names of the harness


def test_the_harness_names_the_towers(capsys):
    from ptq4vit.harness.cli import main
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    for short, cls in (("HF-CLIP-B/16", "CLIPVisionModelWithProjection"), ("HF-SigLIP-B/16", "SiglipVisionModel")):
        assert any(line.split()[:2] == [short, cls] for line in listing.splitlines())
    tiny = dict(img_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64)
    for short, act, width in (("HF-CLIP-B/16", "QuickGELUActivation", 512), ("HF-SigLIP-B/16", "GELUTanh", 32)):
        lm = zoo.create(short, pretrained=False, model_kwargs=tiny)
        tower = getattr(lm.model, "vision_model", lm.model)
        assert type(tower.encoder.layers[0].mlp.activation_fn).__name__ == act
        with torch.no_grad():
            out = lm.model(images(2))
        assert isinstance(out, torch.Tensor) and out.shape == (2, width)  # the image embedding, as quantized
        assert math.isfinite(float(out.abs().max()))

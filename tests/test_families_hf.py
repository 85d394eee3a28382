"""Hugging Face transformers' ViT, DeiT and DINOv2: the five checks of a supported family at a tiny size
(float equivalence, calibration with each preset, checkpoint round trip, integer export on ONNX Runtime and
OpenVINO, the model names of the harness), the refusals, and the real ViT-S/14 converted to DINOv2."""
import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed "
                                                          "(pip install 'ptq4vit[hf]')")

import ptq4vit  # noqa: E402
from ptq4vit import UnsupportedModelError  # noqa: E402
from ptq4vit.harness import zoo  # noqa: E402
from ptq4vit.transforms import RotationOptions, apply_rotation  # noqa: E402

from _family_checks import (FAST, assert_checkpoint_round_trip, assert_only_architecture_keys_saved,  # noqa: E402
                            assert_refused_untouched, calibrate_at_w8a8_and_w4a4, integer_products, max_abs,
                            move_off_init, random_images, rotation_error, rotq_switched_off, run_on_onnx_runtime,
                            run_on_openvino, switched_off)
from _family_checks import logits_or_pooled as output  # noqa: E402
from conftest import REPO  # noqa: E402

TINY = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=96, num_labels=10)
#: model class -> (config class, extra config, sites: patch conv, qkv, two matmuls, o_proj, fc1, fc2 and the heads)
MODELS = {
    "ViTForImageClassification": ("ViTConfig", {}, 8),
    "ViTModel": ("ViTConfig", {}, 8),  # pooler.dense in place of a classifier
    "DeiTForImageClassification": ("DeiTConfig", {}, 8),
    "DeiTForImageClassificationWithTeacher": ("DeiTConfig", {}, 9),  # two classifiers
    "Dinov2ForImageClassification": ("Dinov2Config", dict(mlp_ratio=2), 8),
    "Dinov2Model": ("Dinov2Config", dict(mlp_ratio=2), 7),  # no classifier, no pooler
}


def make(name, attn="eager", seed=0, **extra):
    config_cls, cfg, _ = MODELS[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**TINY, **cfg, **extra}, attn_implementation=attn)
    return getattr(transformers, name)(config).eval()


def images(n=8, seed=1):
    return random_images(n, seed)


# ---- 1. quantization off reproduces the original


@pytest.mark.parametrize("name", sorted(MODELS))
def test_quantization_off_reproduces_eager_attention_bit_for_bit(name):
    _, got, ref = switched_off(make(name), images(), output=output)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("name", ["ViTForImageClassification", "Dinov2ForImageClassification", "Dinov2Model"])
def test_quantization_off_reproduces_sdpa_at_the_float_floor(name):
    """transformers' default attention in eval is SDPA; the quantized attention computes the eager formula
    (its matmuls are sites), which differs from SDPA's fused kernel by float rounding: measured at most 6e-7."""
    model, x = make(name, attn="sdpa"), images()
    assert model.config._attn_implementation == "sdpa"
    _, got, ref = switched_off(model, x, output=output)
    assert (got - ref).abs().max() <= 2e-6


# ---- 2. calibration with each preset


@pytest.mark.parametrize("name", ["ViTForImageClassification", "Dinov2ForImageClassification"])
@pytest.mark.parametrize("preset", ["ptq4vit", "deploy8"])
def test_presets_calibrate_at_w8a8_and_w4a4(name, preset):
    runs, err = calibrate_at_w8a8_and_w4a4(make(name), images(), preset, max_abs, output, same_shape=True)
    for q, _ in runs.values():  # deploy8 keeps the attention matmuls float (docs/deployment.md)
        assert len(q.sites()) == MODELS[name][2] - (0 if q.preset.quantize_attention else 2)
    assert 0 < err[8] < err[4]


# ---- rotations (rotq): folded into the three q/k/v layers


def perturbed(name, dtype, **extra):
    """A 2-layer model with nonzero norm affines, biases, tokens and DINOv2 LayerScales (what the folding moves)."""
    model = make(name, num_hidden_layers=2, **extra)
    move_off_init(model, 0.5, names=("norm", "lambda", "bias", "token", "position"),
                  generator=torch.Generator().manual_seed(1))
    return model.to(dtype)


ALL = RotationOptions(residual=True, heads=True, fc2=True)


@pytest.mark.parametrize("name", ["ViTForImageClassification", "ViTModel", "DeiTForImageClassificationWithTeacher",
                                  "Dinov2ForImageClassification"])
@pytest.mark.parametrize("opts", [RotationOptions(residual=True), RotationOptions(heads=True), RotationOptions(fc2=True),
                                  ALL], ids=["residual", "heads", "fc2", "all"])
def test_rotated_model_reproduces_the_float_model(name, opts):
    """Measured (eager attention): at most 6.7e-16 in float64 and 1.8e-7 in float32, with |outputs| 0.5 to 1.1."""
    for dtype, bound in ((torch.float64, 1e-14), (torch.float32, 1e-6)):
        assert rotation_error(perturbed(name, dtype), images().to(dtype), opts, output) < bound


@pytest.mark.parametrize("name", ["ViTForImageClassification", "Dinov2ForImageClassification"])
def test_rotq_calibrates_at_w8a8_and_w4a4_and_round_trips(name, tmp_path):
    model, x = perturbed(name, torch.float32), images()
    runs, err = calibrate_at_w8a8_and_w4a4(model, x, "rotq", max_abs, output, same_shape=True)
    assert 0 < err[8] < err[4]
    q, _ = runs[4]
    prefix = "vit.layers.0" if name.startswith("ViT") else "dinov2.encoder.layer.0"
    layer = q.model.get_submodule(prefix)
    norms = ("layernorm_before", "layernorm_after") if name.startswith("ViT") else ("norm1", "norm2")
    assert [type(layer.get_submodule(n)).__name__ for n in norms] == ["RMSNorm", "RMSNorm"]
    # fc2's input rotated online after the GELU; DINOv2's LayerScales folded into o_proj and fc2
    assert [type(m).__name__ for m in layer.mlp.activation_fn] == ["GELUActivation", "OnlineRotation"]
    if not name.startswith("ViT"):
        assert [type(layer.layer_scale1).__name__, type(layer.layer_scale2).__name__] == ["Identity", "Identity"]
    assert_checkpoint_round_trip(q, model, x, tmp_path)  # the W4A4 model: its checkpoint rebuilds the rotated structure


def test_rotq_with_quantization_off_is_the_float_model():
    _, got, ref = rotq_switched_off(perturbed("Dinov2ForImageClassification", torch.float32), images(), output)
    assert (got - ref).abs().max() < 1e-6


def test_residual_rotation_of_a_backbone_without_pooler_is_refused_by_name():
    """Dinov2Model returns the normed class token: the last rotation would have no Linear to fold into."""
    model, x = make("Dinov2Model"), images()
    assert_refused_untouched(model, lambda m: ptq4vit.quantize(m, x, "rotq", 6, 6, progress=False),
                             r"^model Dinov2Model has no classifier or pooler to fold the last residual rotation into: "
                             r"its features would come out rotated$")  # refused before anything changed
    with torch.no_grad():
        ref = output(model, x)
        rotated = output(apply_rotation(copy.deepcopy(model), RotationOptions(heads=True, fc2=True)), x)
    assert (rotated - ref).abs().max() < 1e-6


def test_sites_are_the_fused_qkv_the_projections_and_the_matmuls():
    q = ptq4vit.quantize(make("DeiTForImageClassificationWithTeacher"), images(), "base", **FAST)
    layer = "deit.layers.0"
    assert list(q.sites()) == ["deit.embeddings.patch_embeddings.projection", f"{layer}.attention.qkv",
                               f"{layer}.attention.matmul1", f"{layer}.attention.matmul2", f"{layer}.attention.o_proj",
                               f"{layer}.mlp.fc1", f"{layer}.mlp.fc2", "cls_classifier", "distillation_classifier"]


# ---- 3. checkpoint round trip


@pytest.mark.parametrize("name", sorted(MODELS))
def test_checkpoint_round_trip_is_bit_identical(name, tmp_path):
    model, x = make(name), images()
    meta = assert_checkpoint_round_trip(ptq4vit.quantize(model, x, "ptq4vit", **FAST), model, x, tmp_path)
    assert meta["model"]["name"] == name


def test_a_checkpoint_passes_only_architecture_config_keys(tmp_path):
    q = ptq4vit.quantize(make("ViTForImageClassification"), images(), "base", **FAST)
    assert_only_architecture_keys_saved(q, tmp_path, ("trust_remote_code", "name_or_path", "attn_implementation"), "x")


# ---- 4. integer export on ONNX Runtime and OpenVINO


@pytest.mark.parametrize("name", sorted(MODELS))
def test_integer_export_runs_on_onnxruntime_and_openvino(name, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    from ptq4vit.export import export_onnx

    model, x = make(name), images()
    q = ptq4vit.quantize(model, x, "base", **FAST)
    sites = MODELS[name][2]
    with torch.no_grad():
        ref = q(x).numpy()
    for _, rep, out in run_on_onnx_runtime(q, x, tmp_path, input_size=(3, 32, 32)):
        assert (len(rep.sites), sum(s.integer for s in rep.sites)) == (sites, sites - 1)
        assert [s.name for s in rep.fallbacks] == [next(iter(q.sites()))]  # the patch conv: float image input
        assert out.shape == ref.shape and np.abs(out - ref).max() <= 1e-6 * np.abs(ref).max() * 10
    # OpenVINO, on the ptq4vit preset's graph (the base preset's QDQ graph fails to compile in OpenVINO's CPU
    # plugin for timm's ViT too): every quantized product is an integer layer (a twin product counts twice)
    q = ptq4vit.quantize(model, x, "ptq4vit", **FAST)
    rep = export_onnx(q, tmp_path / "ov.onnx", format="qdq", input_size=(3, 32, 32))
    assert sum(s.integer for s in rep.sites) == sites - 1
    out, integer = run_on_openvino(tmp_path / "ov.onnx", x)
    assert integer == integer_products(rep)
    assert out.shape == ref.shape


# ---- refusals


def test_swiglu_mlp_is_refused_by_name():
    model = make("Dinov2ForImageClassification", use_swiglu_ffn=True)
    with pytest.raises(UnsupportedModelError, match="^module 'dinov2.encoder.layer.0.mlp' of type Dinov2SwiGLUFFN is "
                                                    "not supported by the Hugging Face DINOv2 adapter: the SwiGLU MLP"):
        ptq4vit.quantize(model, images(), "base", **FAST)


def test_other_transformers_classes_are_refused_by_name():
    config = transformers.Dinov2WithRegistersConfig(**{**TINY, "mlp_ratio": 2})
    model = transformers.Dinov2WithRegistersForImageClassification(config).eval()
    with pytest.raises(UnsupportedModelError, match="^model type Dinov2WithRegistersForImageClassification is not "
                                                    "supported; the adapter registry has adapters for .*Dinov2Model"):
        ptq4vit.quantize(model, images(), "base", **FAST)


def test_post_gelu_quantizer_needs_the_exact_gelu():
    model = make("ViTForImageClassification", hidden_act="gelu_new")
    with pytest.raises(UnsupportedModelError, match="^module 'vit.layers.0.mlp.activation_fn' of type "
                                                    "NewGELUActivation is not supported .* need the exact GELU"):
        ptq4vit.quantize(model, images(), "ptq4vit", **FAST)
    ptq4vit.quantize(model, images(), "base", **FAST)  # uniform fc2 input: any activation


def test_ptq4vit_imports_without_transformers():
    code = "import sys, ptq4vit, ptq4vit.harness.zoo; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---- 5. model names of the harness


def test_the_harness_names_the_hugging_face_models(capsys):
    from ptq4vit.harness.cli import main
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    for short, cls in (("HF-ViT-B/224", "ViTForImageClassification"), ("HF-DINOv2-S/14", "Dinov2Model"),
                       ("HF-DeiT-S/224", "DeiTForImageClassificationWithTeacher"),
                       ("HF-ViT-S/14-CIFAR10", "Dinov2ForImageClassification")):
        assert any(line.split()[:2] == [short, cls] for line in listing.splitlines())
    tiny = dict(img_size=32, patch_size=8, hidden_size=48, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2)
    lm = zoo.create("hf_dinov2_s14", pretrained=False, model_kwargs=tiny)
    assert type(lm.model).__name__ == "Dinov2Model"
    with torch.no_grad():
        out = lm.model(images(2))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 48)  # the pooled features, as quantized
    q = ptq4vit.quantize(lm.model, images(), "base", **FAST)
    with torch.no_grad(), q.quantization_disabled():  # built with transformers' default SDPA attention: the floor
        assert (q(images(2)) - out).abs().max() <= 2e-6
    with pytest.raises(ptq4vit.UserError, match="^bad model options for Dinov2Model: argument 'trust_remote_code' is "
                                                "not an architecture argument"):
        zoo.create("HF-DINOv2-S/14", pretrained=False, model_kwargs={"trust_remote_code": True})


# ---- the real ViT-S/14 through transformers' DINOv2


def test_real_vit_s14_converted_to_dinov2_gives_the_timm_logits(shared_dir, cifar_dir):
    """The same weights in timm's ViT and in transformers' Dinov2ForImageClassification (both run SDPA
    attention): 0.0 max abs logit difference on these 10 images on the CPU this was written on; the bound is
    the float floor."""
    from PIL import Image
    timm_lm = zoo.create("vit_s14_cifar10", weights=shared_dir / "models")
    hf_lm = zoo.create("vit_s14_cifar10_hf", weights=shared_dir / "models")
    assert type(hf_lm.model).__name__ == "Dinov2ForImageClassification"
    files = [sorted(d.glob("*.jpg"))[0] for d in sorted((cifar_dir / "test").iterdir())]
    tf = timm_lm.transform()
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        a, b = timm_lm.model(x), hf_lm.model(x)
    assert b.shape == (10, 10) and (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_a_config_returning_tuples_is_refused_by_name_in_every_hf_family():
    import test_families_hf_swin as swin
    import test_families_hf_towers as towers
    for module in (sys.modules[__name__], towers, swin):
        for name in sorted(module.MODELS):
            model = module.make(name)
            model.config.return_dict = False
            with pytest.raises(UnsupportedModelError, match=r"config.return_dict=False makes the model return a "
                                                            r"tuple; ptq4vit reads the output by name"):
                ptq4vit.quantize(model, module.images(2), "ptq4vit", 8, 8, progress=False)

"""Hugging Face transformers' Swin (SwinForImageClassification, SwinModel) at a tiny size with random weights:
float equivalence, calibration with each preset, checkpoint round trip, integer export on ONNX Runtime and
OpenVINO, the harness's model name, refusals."""
import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed "
                                                          "(pip install 'ptq4vit[hf]')")

import ptq4vit  # noqa: E402
from ptq4vit import UnsupportedModelError  # noqa: E402
from ptq4vit.harness import zoo  # noqa: E402
from ptq4vit.transforms import OnlineRotation, RotatedLayerNorm, RotationOptions, apply_rotation  # noqa: E402

from _family_checks import (OPENVINO_INT8_EXACT, FAST, assert_checkpoint_round_trip, assert_only_architecture_keys_saved,  # noqa: E402
                            assert_refused_untouched, calibrate_at_w8a8_and_w4a4, integer_products, max_abs,
                            move_off_init, random_images, rotation_error, rotq_switched_off, run_on_onnx_runtime,
                            run_on_openvino, switched_off, within)
from _family_checks import logits_or_pooled as output  # noqa: E402
from _fastq import fast_quantize  # noqa: E402

#: 32x32 images, patch 4: an 8x8 token grid with window 4, so the second layer of the first stage is shifted
#: with a real mask; the second stage (4x4) is one window, unshifted.
TINY = dict(image_size=32, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 2], window_size=4,
            num_labels=10)
PER_LAYER = ["attention.qkv", "attention.matmul1", "attention.matmul2", "attention.o_proj", "mlp.fc1", "mlp.fc2"]


def sites(prefix: str) -> list[str]:
    return [f"{prefix}embeddings.patch_embeddings.projection",
            *[f"{prefix}encoder.layers.0.blocks.{j}.{s}" for j in range(2) for s in PER_LAYER],
            f"{prefix}encoder.layers.0.downsample.reduction",
            *[f"{prefix}encoder.layers.1.blocks.{j}.{s}" for j in range(2) for s in PER_LAYER]]


#: model class -> its sites (the backbone has no classifier; its output is the average-pooled features)
MODELS = {"SwinForImageClassification": sites("swin.") + ["classifier"], "SwinModel": sites("")}


def make(name, attn="eager", seed=0, **extra):
    """Biases, norms and the relative position tables moved off their initial values (transformers zeroes
    the tables, which would hide a bias left out)."""
    torch.manual_seed(seed)
    config = transformers.SwinConfig(**{**TINY, **extra}, attn_implementation=attn)
    return move_off_init(getattr(transformers, name)(config).eval(), 0.1, names=("bias",), vectors=True)


def images(n=4, seed=1):
    return random_images(n, seed)


# ---- 1. quantization off reproduces the original


@pytest.mark.parametrize("name", sorted(MODELS))
def test_quantization_off_reproduces_eager_attention_bit_for_bit(name):
    model, x = make(name), images()
    layer = model.get_submodule(("swin." if name != "SwinModel" else "") + "encoder.layers.0.blocks.1")
    q, got, ref = switched_off(model, x, output=output)
    assert layer.shift_size == 2  # the shifted layer, with a nonzero mask
    assert list(q.sites()) == MODELS[name]
    assert torch.equal(got, ref)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_quantization_off_reproduces_sdpa_at_the_float_floor(name):
    """transformers' default attention in eval is SDPA; the quantized attention computes the eager formula
    (its matmuls are sites), which differs from SDPA's fused kernel by float rounding: measured 6e-8
    (classifier) and 5e-7 (backbone features) on these models."""
    model, x = make(name, attn="sdpa"), images()
    assert model.config._attn_implementation == "sdpa"
    _, got, ref = switched_off(model, x, output=output)
    assert (got - ref).abs().max() <= 2e-6


# ---- 2. calibration with each preset


@pytest.mark.parametrize("preset", ["ptq4vit", "deploy8"])
def test_presets_calibrate_at_w8a8_and_w4a4(preset):
    runs, err = calibrate_at_w8a8_and_w4a4(make("SwinForImageClassification"), images(8), preset, max_abs, output,
                                           same_shape=True)
    for q, _ in runs.values():  # deploy8 keeps the attention matmuls float (docs/deployment.md): 4 layers x 2 matmuls
        assert len(q.sites()) == len(MODELS["SwinForImageClassification"]) - (0 if q.preset.quantize_attention else 8)
    assert 0 < err[8] < err[4]


# ---- 2b. rotations (rotq): one stream per stage through patch merging, folded into the q/k/v layers

ALL = RotationOptions(residual=True, heads=True, fc2=True)


def _with_position_embedding(model):
    with torch.no_grad():  # transformers zeroes it, which would hide a rotation left out
        model.get_submodule("swin.embeddings" if hasattr(model, "swin") else "embeddings").position_embeddings.add_(
            torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(2)) * 0.5)
    return model


@pytest.mark.parametrize("opts", [RotationOptions(residual=True), RotationOptions(heads=True),
                                  RotationOptions(fc2=True), ALL, RotationOptions(True, True, True, "orthogonal", 5)],
                         ids=["residual", "heads", "fc2", "all", "all-orthogonal"])
def test_rotated_swin_reproduces_the_float_model(opts):
    model = _with_position_embedding(make("SwinForImageClassification", use_absolute_embeddings=True))
    # float64: measured max |diff| 8e-17 .. 3.3e-16 with |logits| <= 0.37
    assert rotation_error(model.double(), images().double(), opts, output) < 1e-14
    # float32: measured 3e-8 .. 9e-8
    assert rotation_error(model.float(), images(), opts, output) < 1e-6


def test_residual_rotation_leaves_a_rotated_embedding_norm_and_affine_free_norms():
    m = apply_rotation(make("SwinForImageClassification"), ALL)
    emb, stage = m.swin.embeddings, m.swin.encoder.layers[0]
    assert isinstance(emb.norm, RotatedLayerNorm) and emb.norm.weight.shape == (32, 32)
    layer = stage.blocks[1]
    for norm in (layer.layernorm_before, layer.layernorm_after, stage.downsample.norm, m.swin.layernorm):
        assert type(norm) is torch.nn.LayerNorm and norm.weight is None and norm.bias is None  # means kept
    assert stage.downsample.reduction.bias is not None  # the merging norm's shift, folded
    assert isinstance(layer.mlp.activation_fn[1], OnlineRotation)


def test_rotq_calibrates_round_trips_and_exports(tmp_path):
    model, x = make("SwinForImageClassification"), images(8)
    runs, err = calibrate_at_w8a8_and_w4a4(model, x, "rotq", max_abs, output)
    assert err[8] < err[4]
    q, y = runs[4]
    assert_checkpoint_round_trip(q, model, x, tmp_path, want=y)  # the W4A4 model
    for fmt, rep, got in run_on_onnx_runtime(q, x, tmp_path, input_size=(3, 32, 32)):
        # 4 layers x (qkv, o_proj, fc1, fc2, q@k) + the reduction + the classifier; float: the patch conv (float
        # image input) and softmax@v (rotq's renormalized softmax rows have no integer lowering)
        assert sum(s.integer for s in rep.sites) == 22 and len(rep.sites) == 27
        assert [s.name for s in rep.fallbacks] == ["swin.embeddings.patch_embeddings.projection"] + [
            f"swin.encoder.layers.{i}.blocks.{j}.attention.matmul2" for i in range(2) for j in range(2)]
        assert within(got, y.numpy(), 0.02), fmt


def test_rotq_with_quantization_off_is_the_float_model():
    _, got, ref = rotq_switched_off(make("SwinForImageClassification"), images(), output)
    assert (got - ref).abs().max() < 1e-6  # measured 6e-8


def test_the_bare_backbone_refuses_the_residual_rotation_but_not_the_others():
    model, x = make("SwinModel"), images()
    assert_refused_untouched(model, lambda m: ptq4vit.quantize(m, x, "rotq", 6, 6, progress=False, inplace=True),
                             r"^model SwinModel has no classifier to fold the last residual rotation into: its "
                             r"features would come out rotated$")
    with torch.no_grad():
        ref = output(model, x)
        rotated = output(apply_rotation(copy.deepcopy(model), RotationOptions(heads=True, fc2=True)), x)
    assert (rotated - ref).abs().max() < 1e-6  # measured 6e-8


def test_residual_rotation_refuses_a_grid_that_needs_window_padding():
    """An 8x8 grid with window 3: transformers pads it to 9x9 after layernorm_before, and the zeros would meet
    that norm's shift folded into q/k/v."""
    model = make("SwinForImageClassification", window_size=3)
    with pytest.raises(UnsupportedModelError, match=r"^module 'swin.encoder.layers.0.blocks.0': residual rotation "
                                                    r"needs its 8x8 tokens to fill whole 3x3 windows"):
        apply_rotation(model, ALL)


def test_reparam_ln_is_refused_by_name():
    with pytest.raises(UnsupportedModelError, match=r"^reparam_ln \(RepQ-ViT's LayerNorm reparameterization\) is not "
                                                    r"supported for SwinModel by the Hugging Face Swin adapter$"):
        ptq4vit.quantize(make("SwinModel"), images(), "repq-vit", 6, 6, progress=False)


# ---- 3. checkpoint round trip


@pytest.mark.parametrize("name", sorted(MODELS))
def test_checkpoint_round_trip_is_bit_identical(name, tmp_path):
    model, x = make(name, use_absolute_embeddings=True), images()
    meta = assert_checkpoint_round_trip(ptq4vit.quantize(model, x, "ptq4vit", **FAST), model, x, tmp_path)
    assert meta["model"]["name"] == name
    kw = meta["model"]["create_kwargs"]
    assert (kw["depths"], kw["num_heads"], kw["window_size"], kw["use_absolute_embeddings"]) == ([2, 2], [2, 2], 4, True)


def test_a_checkpoint_passes_only_architecture_config_keys(tmp_path):
    q = ptq4vit.quantize(make("SwinModel"), images(), "base", **FAST)
    assert_only_architecture_keys_saved(q, tmp_path, ("trust_remote_code", "name_or_path", "use_mask_token"), True)


# ---- 4. integer export on ONNX Runtime and OpenVINO


@pytest.mark.parametrize("name", sorted(MODELS))
def test_integer_export_runs_on_onnxruntime_and_openvino(name, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    model, x = make(name), images()
    q = fast_quantize(model, x)
    n = len(MODELS[name])
    with torch.no_grad():
        ref = q(x).numpy()
    for fmt, rep, out in run_on_onnx_runtime(q, x, tmp_path, input_size=(3, 32, 32)):
        assert (len(rep.sites), sum(s.integer for s in rep.sites)) == (n, n - 1)
        assert [s.name for s in rep.fallbacks] == [MODELS[name][0]]  # the patch conv: float image input
        assert out.shape == ref.shape and within(out, ref, 0.02), fmt
    out, integer = run_on_openvino(tmp_path / "qdq.onnx", x)
    if OPENVINO_INT8_EXACT:
        assert within(out, ref, 0.02)
    assert integer == integer_products(rep) + OPENVINO_DIFFERENCE


#: OpenVINO's integer layers minus the QDQ graph's integer products: the patch-merging reduction runs as two
#: integer layers there, as for timm's Swin V2.
OPENVINO_DIFFERENCE = 1


# ---- refusals


def test_other_swin_classes_are_refused_by_name():
    model = transformers.SwinForMaskedImageModeling(transformers.SwinConfig(**TINY)).eval()
    with pytest.raises(UnsupportedModelError, match="^model type SwinForMaskedImageModeling is not supported; the "
                                                    "adapter registry has adapters for .*SwinModel"):
        ptq4vit.quantize(model, images(), "base", **FAST)


def test_a_mask_token_is_refused_by_name():
    model = transformers.SwinModel(transformers.SwinConfig(**TINY), use_mask_token=True).eval()
    with pytest.raises(UnsupportedModelError, match="^module 'embeddings' of type SwinEmbeddings is not supported by "
                                                    "the Hugging Face Swin adapter: a mask token"):
        ptq4vit.quantize(model, images(), "base", **FAST)


def test_post_gelu_quantizer_needs_the_exact_gelu():
    model = make("SwinForImageClassification", hidden_act="gelu_new")
    with pytest.raises(UnsupportedModelError, match="^module 'swin.encoder.layers.0.blocks.0.mlp.activation_fn' of "
                                                    "type NewGELUActivation is not supported .* need the exact GELU"):
        ptq4vit.quantize(model, images(), "ptq4vit", **FAST)


# ---- 5. model names of the harness


def test_the_harness_names_the_hugging_face_swin(capsys, tmp_path, cifar_dir):
    from ptq4vit.harness.cli import main
    assert main(["models"]) == 0
    assert any(line.split()[:2] == ["HF-Swin-T/224", "SwinForImageClassification"]
               for line in capsys.readouterr().out.splitlines())
    tiny = dict(img_size=32, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 2], window_size=4,
                num_classes=10)
    lm = zoo.create("HF-Swin-T/224", pretrained=False, model_kwargs=tiny)
    with torch.no_grad():
        assert lm.model(images(2)).shape == (2, 10)  # the logits tensor, as quantized
    assert main(["quantize", "--model", "HF-Swin-T/224", "--model-kwargs", json.dumps(tiny), "--random-init",
                 "--data", str(cifar_dir), "--val-split", "test", "--calib-dir", str(cifar_dir / "calib"),
                 "--limit", "1", "--workers", "0", "--no-progress", "--set", "n_candidates=4", "--set", "rounds=1",
                 "--calib-size", "4", "--bits", "W8A8", "--preset", "base", "--out", str(tmp_path / "runs")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "runs" / "results.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == ["HF-Swin-T/224"]

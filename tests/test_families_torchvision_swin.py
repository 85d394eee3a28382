"""torchvision's SwinTransformer, v1 (swin_t layout) and V2 (swin_v2_t layout), at a tiny size with random
weights: float equivalence, calibration with each preset, checkpoint round trip, integer export, CLI names,
refusals."""
import copy
import json

import pytest
import torch
from torch import nn
from torchvision.models import SwinTransformer
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2

import ptq4vit
from ptq4vit.errors import UserError
from ptq4vit.models import DEFAULT_ADAPTERS, insert_quant_sites
from ptq4vit.models.torchvision_swin import QuantShiftedWindowAttention, QuantShiftedWindowAttentionV2
from ptq4vit.presets import get_preset
from ptq4vit.transforms import OnlineRotation, RotatedLayerNorm, RotationOptions, apply_rotation

from _family_checks import (OPENVINO_INT8_EXACT, FAST, assert_checkpoint_round_trip, assert_crafted_torchvision_checkpoint_refused,
                            assert_refused_untouched, calibrate_at_w8a8_and_w4a4, integer_products, move_off_init,
                            random_images, rel, rotation_error, rotq_switched_off, run_on_onnx_runtime, run_on_openvino,
                            unquantized, within)
from _fastq import fast_quantize

#: 32x32 images, patch 4: an 8x8 token grid, window 4, so the second block of the first stage is shifted
#: with a real mask; head dim 16 in both stages (the scale 1/4 a power of two: scaling after q @ kᵀ changes no bit).
TINY = dict(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=10,
            stochastic_depth_prob=0.1)
V2 = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2)
PER_BLOCK = ["attn.qkv", "attn.matmul1", "attn.matmul2", "attn.proj", "mlp.0", "mlp.3"]
SITES = ["features.0.0", *[f"features.1.{j}.{s}" for j in range(2) for s in PER_BLOCK], "features.2.reduction",
         *[f"features.3.{j}.{s}" for j in range(2) for s in PER_BLOCK], "head"]


def tiny_swin(version: str = "v1", seed: int = 0, **kw) -> SwinTransformer:
    """Biases, norms, position-bias tables and logit scales moved off their initial values (torchvision
    zeroes several of them, and V2 the k part of the qkv bias, which would hide a bias left out)."""
    torch.manual_seed(seed)
    model = SwinTransformer(**{**TINY, **(V2 if version == "v2" else {}), **kw}).eval()
    return move_off_init(model, 0.1, names=("bias", "logit_scale"), vectors=True)


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return random_images(n, seed)


def _unquantized(model: nn.Module):
    return unquantized(model, "torchvision_SwinTransformer")


# ------------------------------------------------------------------ structure and refusals


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_every_product_is_a_site(version):
    m = copy.deepcopy(tiny_swin(version))
    assert list(insert_quant_sites(m, get_preset("ptq4vit"), 8, 8)) == SITES
    attn = m.features[1][1].attn
    assert type(attn) is (QuantShiftedWindowAttentionV2 if version == "v2" else QuantShiftedWindowAttention)
    assert attn.qkv.w_quant.groups == 3  # one weight scale per q, k, v
    if version == "v2":  # the position bias MLP stays float, inside the replaced attention
        assert [type(c).__name__ for c in attn.cpb_mlp] == ["Linear", "ReLU", "Linear"]


def test_the_tiny_model_really_shifts_and_masks():
    block = tiny_swin().features[1][1]
    assert block.attn.shift_size == [2, 2] and block.attn.window_size == [4, 4]  # on an 8x8 grid: a nonzero mask


def test_v2_qkv_site_zeroes_the_k_bias_as_torchvision_does():
    m = tiny_swin("v2")
    bias = m.features[1][0].attn.qkv.bias
    assert bias[32:64].abs().min() > 0  # the float parameter has a k bias, which torchvision ignores
    q = copy.deepcopy(m)
    insert_quant_sites(q, get_preset("ptq4vit"), 8, 8)
    site_bias = q.features[1][0].attn.qkv.bias
    assert torch.equal(site_bias[32:64], torch.zeros(32))
    assert torch.equal(site_bias[:32], bias[:32]) and torch.equal(site_bias[64:], bias[64:])


REFUSED = {
    "mixed versions": (lambda: _with_block(1, 1, "v2"), "features.3.1", "expected torchvision's SwinTransformerBlock"),
    "other attention": (lambda: _with_attention(), "features.1.0.attn", "only torchvision's ShiftedWindowAttention"),
    "other patch merging": (lambda: tiny_swin(downsample_layer=PatchMergingV2), "features.2",
                            "expected torchvision's PatchMerging here"),
    "stray linear": (lambda: _with_stray(), "features.1.0.norm1.0", "a stray Linear"),
}


def _with_block(stage_index, j, version):
    m = tiny_swin()
    other = tiny_swin(version)
    m.features[2 * stage_index + 1][j] = other.features[2 * stage_index + 1][j]
    return m


def _with_attention():
    m = tiny_swin()
    m.features[1][0].attn = nn.MultiheadAttention(32, 2, batch_first=True)
    return m


def _with_stray():
    m = tiny_swin()
    m.features[1][0].norm1 = nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32))
    return m


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unknown_layouts_are_refused_by_name_and_left_untouched(case):
    make, module, words = REFUSED[case]
    assert_refused_untouched(make(), lambda m: insert_quant_sites(m, get_preset("ptq4vit"), 8, 8),
                             f"^module '{module}' of type .*: .*{words}")


# ------------------------------------------------------------------ 1. float equivalence


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_with_quantization_off_it_computes_what_torchvision_computes_bit_for_bit(version):
    for seed in range(2):
        m, x = tiny_swin(version, seed), images(seed=seed + 1)
        with torch.no_grad():
            assert torch.equal(_unquantized(m)(x), m(x))


def test_a_head_dim_that_is_not_a_power_of_four_moves_the_scale_at_the_float_floor():
    """torchvision scales q before q @ kᵀ, the quantized attention the product after it (so that the
    unscaled q and k are quantized): with head dim 8 the scale 8^-0.5 is not a power of two and the two
    orders round differently; measured 8e-8 relative on this model."""
    m, x = tiny_swin(embed_dim=16), images()
    with torch.no_grad():
        got, ref = _unquantized(m)(x), m(x)
    assert 0 < rel(got, ref) < 1e-6


def test_other_image_sizes_pad_as_torchvision_does():
    m = tiny_swin()  # 36x36: a 9x9 grid, padded to whole windows and to even sizes before patch merging
    x = torch.randn(2, 3, 36, 36, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(_unquantized(m)(x), m(x))


# ------------------------------------------------------------------ 2. calibration with each preset


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("preset", ["ptq4vit", "deploy8"])
def test_presets_calibrate_at_w8a8_and_w4a4(version, preset):
    _, errors = calibrate_at_w8a8_and_w4a4(tiny_swin(version), images(8), preset, rel)
    assert errors[8] < errors[4]


@pytest.mark.parametrize("version,preset,words", [
    ("v2", "rotq", r"^module 'features.1.0': rotation is not supported for Swin V2 blocks: they are res-post-norm "
                   r"\(no norm output for the residual rotation to fold into\) with cosine attention$"),
    ("v1", "repq-vit", r"^reparam_ln \(RepQ-ViT's LayerNorm reparameterization\) is not supported for "
                       r"SwinTransformer by the torchvision SwinTransformer adapter$"),
])
def test_v2_rotations_and_reparam_are_refused_by_name(version, preset, words):
    assert_refused_untouched(
        tiny_swin(version), lambda m: ptq4vit.quantize(m, images(), preset, 6, 6, progress=False, inplace=True), words)


# ------------------------------------------------------------------ 2b. rotations (rotq) on v1

ALL = RotationOptions(residual=True, heads=True, fc2=True)


@pytest.mark.parametrize("opts", [RotationOptions(residual=True), RotationOptions(heads=True),
                                  RotationOptions(fc2=True), ALL, RotationOptions(True, True, True, "orthogonal", 5)],
                         ids=["residual", "heads", "fc2", "all", "all-orthogonal"])
def test_rotated_v1_reproduces_the_float_model(opts):
    # float64: measured max |diff| 1.1e-16 .. 3.3e-16 with |logits| <= 0.56
    assert rotation_error(tiny_swin().double(), images().double(), opts) < 1e-14
    # float32: measured 6e-8 .. 1.2e-7
    assert rotation_error(tiny_swin(), images(), opts) < 1e-6


def test_residual_rotation_leaves_a_rotated_stem_norm_and_affine_free_norms():
    m = apply_rotation(tiny_swin(), ALL)
    assert isinstance(m.features[0][2], RotatedLayerNorm) and m.features[0][2].weight.shape == (32, 32)
    blk = m.features[3][1]
    for norm in (blk.norm1, blk.norm2, m.features[2].norm, m.norm):  # each token's mean is kept
        assert type(norm) is nn.LayerNorm and norm.weight is None and norm.bias is None
    assert m.features[2].reduction.bias is not None  # the merging norm's shift, folded
    assert isinstance(blk.mlp[2], OnlineRotation)


def test_rotq_calibrates_round_trips_and_exports(tmp_path):
    m, x = tiny_swin(), images(8)
    runs, errors = calibrate_at_w8a8_and_w4a4(m, x, "rotq", rel)
    assert errors[8] < errors[4]
    q, out = runs[4]  # the W4A4 model: its checkpoint rebuilds the rotated structure
    assert_checkpoint_round_trip(q, m, x, tmp_path, want=out)
    for fmt, rep, got in run_on_onnx_runtime(q, x, tmp_path, input_size=(3, 32, 32)):
        # 4 blocks x (qkv, proj, fc1, fc2, q@k) + the reduction + the head; float: the patch conv (float image
        # input) and softmax@v (rotq's renormalized softmax rows have no integer lowering)
        assert sum(s.integer for s in rep.sites) == 22 and len(rep.sites) == 27
        assert [s.name for s in rep.fallbacks] == ["features.0.0"] + [
            f"features.{i}.{j}.attn.matmul2" for i in (1, 3) for j in range(2)]
        assert within(got, out.numpy(), 0.02), fmt


def test_rotq_with_quantization_off_is_the_float_model():
    _, got, ref = rotq_switched_off(tiny_swin(), images())
    assert (got - ref).abs().max() < 1e-6  # measured 1.2e-7


def test_a_rotated_model_refuses_a_grid_that_needs_window_padding():
    """36x36 images: a 9x9 grid, which torchvision pads to 12x12 after norm1; the zeros would meet norm1's
    shift that the residual rotation folded into qkv's bias."""
    q = ptq4vit.quantize(tiny_swin(), images(), "rotq", 8, 8, **FAST)
    x = torch.randn(2, 3, 36, 36, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), pytest.raises(UserError, match=r"^a 9x9 token grid does not fill whole 4x4 windows, which "
                                                          r"the rotated model needs"):
        q(x)
    unrotated = ptq4vit.quantize(tiny_swin(), images(), "ptq4vit", 8, 8, **FAST)
    with torch.no_grad():
        assert torch.isfinite(unrotated(x)).all()  # padding is exact without the folded shift


# ------------------------------------------------------------------ 3. checkpoint round trip


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_checkpoint_round_trip_is_bit_identical(version, tmp_path):
    m, x = tiny_swin(version), images()
    meta = assert_checkpoint_round_trip(ptq4vit.quantize(m, x, "ptq4vit", **FAST), m, x, tmp_path)
    assert meta["model"]["name"] == "torchvision_SwinTransformer"
    block, merging = ("SwinTransformerBlockV2", "PatchMergingV2") if version == "v2" else ("SwinTransformerBlock",
                                                                                          "PatchMerging")
    assert meta["model"]["create_kwargs"] == dict(
        num_classes=10, patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
        mlp_ratio=4.0, dropout=0.0, attention_dropout=0.0, block=block,
        downsample_layer=merging)


@pytest.mark.parametrize("key,value,words", [("weights", "IMAGENET1K_V1", "argument 'weights' is not an architecture"),
                                             ("norm_layer", "x", "argument 'norm_layer' is not an architecture"),
                                             ("block", "os.system", "argument 'block' must be one of")])
def test_a_crafted_checkpoint_cannot_ask_for_weights_or_other_classes(tmp_path, monkeypatch, key, value, words):
    q = ptq4vit.quantize(tiny_swin(), images(), "base", **FAST)
    assert_crafted_torchvision_checkpoint_refused(q, tmp_path, monkeypatch, key, value, words)


@pytest.mark.parametrize("name,version", [("swin_t", "SwinTransformerBlock"),
                                          ("swin_v2_t", "SwinTransformerBlockV2")])
def test_builder_names_build_the_architecture_without_weights(name, version):
    adapter = DEFAULT_ADAPTERS.adapter_for_name(name)
    with torch.device("meta"):
        m = adapter.create_model(name, num_classes=3)
    assert type(m) is SwinTransformer and type(m.features[1][0]).__name__ == version
    assert m.head.out_features == 3


# ------------------------------------------------------------------ 4. integer export


#: OpenVINO's integer layers minus the QDQ graph's integer products (a twin site counts two): OpenVINO splits
#: the patch-merging reduction (on the 4-d concatenated neighbours) into two integer FullyConnected layers
#: (V2, as for timm's Swin V2) or three (v1, where the norm's affine comes before it).
OPENVINO_DIFFERENCE = {"v1": 2, "v2": 1}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_integer_export_runs_on_onnx_runtime_and_openvino(version, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    m, x = tiny_swin(version), images()
    q = fast_quantize(m, x)
    with torch.no_grad():
        ref = q(x).numpy()
    for fmt, rep, out in run_on_onnx_runtime(q, x, tmp_path, input_size=(3, 32, 32)):
        # 2 stages x 2 blocks x 6 + the reduction + the head in integers; the patch conv (float image input) float
        assert sum(s.integer for s in rep.sites) == 26 == len(q.sites()) - 1
        assert [s.name for s in rep.fallbacks] == ["features.0.0"]
        assert within(out, ref, 0.02), fmt
    out, integer = run_on_openvino(tmp_path / "qdq.onnx", x)
    if OPENVINO_INT8_EXACT:
        assert within(out, ref, 0.02)
    assert integer == integer_products(rep) + OPENVINO_DIFFERENCE[version]


# ------------------------------------------------------------------ 5. model names and the command line


def test_models_command_lists_the_torchvision_swin_builders(capsys):
    from ptq4vit.harness.cli import main
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b"):
        assert any(line.split()[:2] == [name, "(torchvision)"] for line in out.splitlines()), name


def test_builder_names_need_local_weights_and_carry_torchvisions_transform():
    from ptq4vit.errors import UserError
    from ptq4vit.harness import zoo
    with pytest.raises(UserError, match="^model swin_v2_t has no hub weights: pass --weights FILE"):
        zoo.create("swin_v2_t")
    assert zoo.resolve("swin_v2_t").data_config["input_size"] == (3, 256, 256)
    kwargs = {k: v for k, v in TINY.items()}
    lm = zoo.create("torchvision_SwinTransformer", pretrained=False, model_kwargs=kwargs)
    assert type(lm.model) is SwinTransformer


def test_cli_quantizes_and_saves_a_torchvision_swin(cifar_dir, tmp_path):
    from ptq4vit.harness.cli import main
    kwargs = dict(TINY, block="SwinTransformerBlockV2", downsample_layer="PatchMergingV2")
    assert main(["quantize", "--model", "torchvision_SwinTransformer", "--model-kwargs", json.dumps(kwargs),
                 "--random-init", "--data", str(cifar_dir), "--val-split", "test", "--calib-dir",
                 str(cifar_dir / "calib"), "--limit", "2", "--workers", "0", "--no-progress", "--set",
                 "n_candidates=4", "--set", "rounds=1", "--calib-size", "4", "--bits", "W8A8", "--preset", "base",
                 "--out", str(tmp_path / "run"), "--save", str(tmp_path / "q.safetensors")]) == 0
    meta = ptq4vit.checkpoint.read_metadata(tmp_path / "q.safetensors")
    assert meta["model"]["name"] == "torchvision_SwinTransformer"
    assert meta["model"]["create_kwargs"]["block"] == "SwinTransformerBlockV2"

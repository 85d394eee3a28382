"""The timm families beyond ViT/DeiT/Swin v1: BEiT, Swin V2, EVA-02 and the SigLIP image towers
(timm's ViT with the attention-pool head), each at a tiny size, random init, through the five
checks: switched off the wrapped model computes timm's output bit for bit; ``ptq4vit`` and
``deploy8`` calibrate at W8A8 and W4A4, ``rotq`` too on BEiT and the SigLIP towers, on EVA-02 with its
``rotate_heads`` off (refused by name: the rotary embedding), and is refused by name on Swin V2; a checkpoint round trip is
bit-identical; the integer ONNX export (contrib and QDQ) runs on ONNX Runtime and OpenVINO with its
integer sites counted; ``ptq4vit models`` lists the family and the command line takes its name."""
import copy

import pytest
import timm
import torch

import ptq4vit
from ptq4vit.errors import UnsupportedModelError
from ptq4vit.harness import zoo
from ptq4vit.harness.cli import main
from ptq4vit.models import insert_quant_sites
from ptq4vit.presets import get_preset
from ptq4vit.quantized import QuantizedModel, model_name
from ptq4vit.transforms import OnlineRotation, RMSNorm, RotationOptions, apply_rotation

from _family_checks import (OPENVINO_INT8_EXACT, FAST, assert_checkpoint_round_trip, calibrate_at_w8a8_and_w4a4, integer_products,
                            move_off_init, random_images, rel, rotation_error, rotq_switched_off, run_on_onnx_runtime,
                            run_on_openvino, within)
from _fastq import fast_quantize
from conftest import timm_unfused

# Head dim 16: the attention scale 1/4 is a power of two, so applying it after q@kᵀ (ptq4vit) instead
# of before (timm) changes no bit. 32x32 images; the Swin V2 window 4 on an 8x8 grid makes the second
# block of the first stage shifted, with a real mask.
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
FAMILIES = {
    "beit": ("beit_base_patch16_224", TINY),
    "beit-swiglu-shared-bias": ("beit_base_patch16_224", dict(TINY, swiglu_mlp=True, use_shared_rel_pos_bias=True,
                                                              use_rel_pos_bias=False)),
    "swinv2": ("swinv2_tiny_window8_256", dict(img_size=32, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2),
                                               num_heads=(2, 2), num_classes=10)),
    "eva02": ("eva02_tiny_patch14_224", TINY),  # fused qkv with q/v bias, packed SwiGLU
    "eva02-base-layout": ("eva02_base_patch14_224", TINY),  # q/k/v projections, SwiGLU with sub-LayerNorm
    "siglip": ("vit_base_patch16_siglip_224", TINY),  # attention-pool head
}
PER_BLOCK = ["attn.qkv", "attn.matmul1", "attn.matmul2", "attn.proj", "mlp.fc1", "mlp.fc2"]
EVA_BASE_BLOCK = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.matmul1", "attn.matmul2", "attn.proj",
                  "mlp.fc1_g", "mlp.fc1_x", "mlp.fc2"]
ATTN_POOL = ["attn_pool.q", "attn_pool.kv", "attn_pool.matmul1", "attn_pool.matmul2", "attn_pool.proj",
             "attn_pool.mlp.fc1", "attn_pool.mlp.fc2"]
SITES = {
    "beit": ["patch_embed.proj", *[f"blocks.{i}.{s}" for i in range(2) for s in PER_BLOCK], "head"],
    "beit-swiglu-shared-bias": ["patch_embed.proj", *[f"blocks.{i}.{s}" for i in range(2) for s in (
        *PER_BLOCK[:4], "mlp.fc1_g", "mlp.fc1_x", "mlp.fc2")], "head"],
    "swinv2": ["patch_embed.proj", *[f"layers.0.blocks.{j}.{s}" for j in range(2) for s in PER_BLOCK],
               "layers.1.downsample.reduction", *[f"layers.1.blocks.{j}.{s}" for j in range(2) for s in PER_BLOCK],
               "head.fc"],
    "eva02": ["patch_embed.proj", *[f"blocks.{i}.{s}" for i in range(2) for s in PER_BLOCK], "head"],
    "eva02-base-layout": ["patch_embed.proj", *[f"blocks.{i}.{s}" for i in range(2) for s in EVA_BASE_BLOCK], "head"],
    "siglip": ["patch_embed.proj", *[f"blocks.{i}.{s}" for i in range(2) for s in PER_BLOCK], *ATTN_POOL, "head"],
}


def make(family: str):
    """The tiny model, its biases, LayerScales and position-bias tables made nonzero (timm initialises
    several of them to zero, which would hide a bias left out), and 4 images."""
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    return move_off_init(model, 0.1, names=("bias", "gamma"), vectors=True), random_images(4)


# ---------------------------------------------------------------- 1. switched off: timm's output


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_switched_off_the_wrapped_model_computes_timms_output_bit_for_bit(family):
    model, x = make(family)
    q = copy.deepcopy(model)
    sites = insert_quant_sites(q, get_preset("ptq4vit"), 8, 8)
    assert list(sites) == SITES[family]
    qm = QuantizedModel(q, get_preset("ptq4vit"), 8, 8, model_name(model))
    with torch.no_grad(), qm.quantization_disabled():
        assert torch.equal(qm(x), timm_unfused(model, x))


def test_swinv2_tiny_config_really_masks_and_the_float_parts_are_listed():
    model, _ = make("swinv2")
    shifted = model.layers[0].blocks[1]
    assert tuple(shifted.shift_size) == (2, 2) and shifted.attn_mask.abs().sum() > 0
    q = copy.deepcopy(model)
    insert_quant_sites(q, get_preset("ptq4vit"), 8, 8)
    attn = q.layers[0].blocks[1].attn
    # the position bias MLP stays float: plain Linear layers inside the replaced attention
    assert [type(m).__name__ for m in attn.cpb_mlp] == ["Linear", "ReLU", "Linear"]
    assert attn.logit_scale is model.layers[0].blocks[1].attn.logit_scale or torch.equal(
        attn.logit_scale, model.layers[0].blocks[1].attn.logit_scale)


# ---------------------------------------------------------------- 2. calibration, rotq refused


@pytest.mark.parametrize("family", ["beit", "swinv2", "eva02", "eva02-base-layout", "siglip"])
@pytest.mark.parametrize("preset", ["ptq4vit", "deploy8"])
def test_presets_calibrate_at_w8a8_and_w4a4(family, preset):
    _, err = calibrate_at_w8a8_and_w4a4(*make(family), preset, rel)
    assert err[8] < err[4], err


@pytest.mark.parametrize("family, message", [
    ("beit-swiglu-shared-bias", "module 'blocks.0.mlp': rotation needs timm's Mlp, not SwiGLU (swiglu_mlp=True)"),
    ("swinv2", "rotation (rotate_residual, rotate_heads, rotate_fc2) is not supported for SwinTransformerV2 by the "
               "timm SwinTransformerV2 adapter"),
    ("eva02", "module 'rope': rotate_heads does not apply to Eva with a rotary position embedding: it rotates q and k "
              "between qkv and q @ kᵀ, which a per-head rotation of q and k does not commute with (set "
              "rotate_heads=False: the residual and fc2 rotations apply)"),
])
def test_rotq_is_refused_by_name(family, message):
    model, x = make(family)
    with pytest.raises(UnsupportedModelError) as err:
        ptq4vit.quantize(model, x, "rotq", 4, 4, **FAST)
    assert message in str(err.value)


# ---------------------------------------------------------------- 2b. rotq on BEiT

ALL = RotationOptions(residual=True, heads=True, fc2=True)


def tiny_beit(dtype=torch.float32, **kw):
    """BEiT with its biases, LayerScales, tokens and position embedding moved well off their initial values
    and a head of ordinary size (timm scales it by 0.001, which would hide the features behind its bias)."""
    return tiny_rot("beit", dtype, **kw)


BEIT_POOLS = {"avg-fc_norm": {}, "token-shared-bias-abs-pos": dict(global_pool="token", use_shared_rel_pos_bias=True,
                                                                   use_rel_pos_bias=False, use_abs_pos_emb=True)}


@pytest.mark.parametrize("pool", sorted(BEIT_POOLS))
@pytest.mark.parametrize("opts", [RotationOptions(residual=True), RotationOptions(heads=True),
                                  RotationOptions(fc2=True), ALL, RotationOptions(True, True, True, "orthogonal", 5)],
                         ids=["residual", "heads", "fc2", "all", "all-orthogonal"])
def test_rotated_beit_reproduces_the_float_model(opts, pool):
    # float64: measured max |diff| 4.4e-16 .. 2.2e-15 with |logits| <= 3.9
    assert rotation_error(*tiny_beit(torch.float64, **BEIT_POOLS[pool]), opts) < 1e-14
    # float32: measured 2.4e-7 .. 9.5e-7
    assert rotation_error(*tiny_beit(**BEIT_POOLS[pool]), opts) < 2e-6


def test_beit_rotation_moves_the_qv_biases_into_qkv_and_folds_the_layer_scales():
    m, _ = tiny_beit()
    attn, blk = m.blocks[1].attn, m.blocks[1]
    want = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)).detach().clone()
    assert attn.qkv.bias is None and blk.gamma_1 is not None
    apply_rotation(m, RotationOptions(fc2=True))  # nothing folds into qkv: its bias is the moved q/k/v biases
    assert attn.q_bias is None and attn.k_bias is None and attn.v_bias is None
    assert torch.equal(attn.qkv.bias, want)
    m, _ = tiny_beit()
    blk = m.blocks[1]
    apply_rotation(m, ALL)
    assert blk.gamma_1 is None and blk.gamma_2 is None  # folded into proj and fc2
    assert type(blk.norm1) is RMSNorm and type(m.fc_norm) is RMSNorm and isinstance(blk.mlp.norm, OnlineRotation)


def test_rotq_on_beit_calibrates_round_trips_and_exports(tmp_path):
    m, x = tiny_beit()
    runs, err = calibrate_at_w8a8_and_w4a4(m, x, "rotq", rel)
    assert err[8] < err[4], err
    q, out = runs[4]
    assert_checkpoint_round_trip(q, m, x, tmp_path, want=out)  # the W4A4 model
    for fmt, rep, got in run_on_onnx_runtime(q, x, tmp_path, input_size=(3, 32, 32)):
        # 2 blocks x (qkv, proj, fc1, fc2, q@k) + the head; float: the patch conv (float image input) and
        # softmax@v (rotq's renormalized softmax rows have no integer lowering)
        assert sum(s.integer for s in rep.sites) == 11 and len(rep.sites) == 14
        assert [s.name for s in rep.fallbacks] == ["patch_embed.proj", "blocks.0.attn.matmul2",
                                                   "blocks.1.attn.matmul2"]
        assert within(got, out.numpy(), 0.02), fmt


def test_rotq_beit_with_quantization_off_is_the_float_model():
    _, got, ref = rotq_switched_off(*tiny_beit())
    assert (got - ref).abs().max() < 2e-6


# ---------------------------------------------------------------- 2c. rotq on the SigLIP towers and EVA-02


def tiny_rot(family, dtype=torch.float32, **kw):
    """A tiny model of ``family`` with its biases, norms, tokens, position embeddings, the pool's latent and EVA's
    LayerScales moved well off their initial values and a head of ordinary size (timm scales it by 0.001)."""
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **{**kwargs, **kw}).eval()
    gen = torch.Generator().manual_seed(1)
    move_off_init(model, 0.5, names=("bias", "gamma", "token", "pos_embed", "latent"), vectors=True, generator=gen)
    with torch.no_grad():
        model.head.weight.normal_(0, 0.2, generator=gen)
    return model.to(dtype), torch.randn(4, 3, 32, 32, generator=gen).to(dtype)


RESIDUAL_FC2 = RotationOptions(residual=True, fc2=True)
ROT_CASES = [
    *[("siglip", {}, o) for o in (RotationOptions(residual=True), RotationOptions(heads=True), RotationOptions(fc2=True),
                                  ALL)],
    *[("eva02", dict(init_values=0.1), o) for o in (RotationOptions(residual=True), RotationOptions(fc2=True),
                                                     RESIDUAL_FC2)],
    ("eva02-base-layout", {}, RESIDUAL_FC2),  # q/k/v projections, fc2's rotation after the SwiGLU's sub-LayerNorm
    ("eva02", dict(use_rot_pos_emb=False, global_pool="token"), ALL),  # no rotary embedding: the heads rotate too
]


@pytest.mark.parametrize("family, kw, opts", ROT_CASES, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(ROT_CASES)])
def test_rotated_siglip_and_eva_reproduce_the_float_model(family, kw, opts):
    # float64: measured max |diff| 2.2e-16 .. 2.2e-15 with |logits| 1.5 .. 3.2
    assert rotation_error(*tiny_rot(family, torch.float64, **kw), opts) < 1e-14
    # float32: measured 1.2e-7 .. 7.2e-7
    assert rotation_error(*tiny_rot(family, **kw), opts) < 2e-6


def test_eva_heads_refused_before_anything_changes():
    """rotq as a whole is refused by name on EVA-02 (rotate_heads and the rotary embedding) before the q/v biases
    move or anything folds."""
    m, x = tiny_rot("eva02", init_values=0.1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match=r"^module 'rope': rotate_heads does not apply"):
        apply_rotation(m, ALL)
    assert m.state_dict().keys() == before.keys() and all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def _headless(m):
    m.reset_classifier(0)


def _two_final_norms(m):
    m.norm, m.fc_norm = torch.nn.LayerNorm(32), torch.nn.LayerNorm(32)


def _block_norm_replaced(m):
    m.blocks[1].norm2 = torch.nn.RMSNorm(32)


FINAL_AND_BLOCK_NORM_REFUSALS = [
    (_headless, "module 'head': residual rotation needs a Linear classifier to fold the last rotation into, not "
                "Identity (num_classes=0 would return rotated features)"),
    (_two_final_norms, "residual rotation needs exactly one final LayerNorm (norm or fc_norm)"),
    (_block_norm_replaced, "module 'blocks.1.norm2': residual rotation needs a LayerNorm"),
]


@pytest.mark.parametrize("family", ["beit", "eva02"])
@pytest.mark.parametrize("change, message", FINAL_AND_BLOCK_NORM_REFUSALS, ids=["headless", "two-norms", "block-norm"])
def test_beit_and_eva_refuse_a_head_or_norm_the_residual_rotation_cannot_fold_into(family, change, message):
    """BEiT and EVA-02 share these checks: each refusal names the module, before anything changes."""
    m, _ = tiny_beit() if family == "beit" else tiny_rot(family, init_values=0.1)
    change(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(UnsupportedModelError) as err:
        apply_rotation(m, RotationOptions(residual=True))
    assert str(err.value) == message
    assert m.state_dict().keys() == before.keys() and all(torch.equal(before[k], v) for k, v in m.state_dict().items())


#: (sites, integer sites) of rotq's QDQ export: float are the patch conv (float image input) and every
#: softmax @ v (rotq's renormalized softmax rows have no integer lowering), the attention pool's too.
ROTQ_EXPORT = {"siglip": (21, 17), "eva02": (14, 11)}


@pytest.mark.parametrize("family", sorted(ROTQ_EXPORT))
def test_rotq_on_siglip_and_eva_calibrates_round_trips_and_exports(family, tmp_path):
    """EVA-02 with rotate_heads off (as ``--set rotate_heads=False``); its LayerScales folded into proj and fc2."""
    kw, overrides = (dict(init_values=0.1), dict(rotate_heads=False)) if family == "eva02" else ({}, {})
    m, x = tiny_rot(family, **kw)
    runs, err = calibrate_at_w8a8_and_w4a4(m, x, "rotq", rel, **overrides)
    assert err[8] < err[4], err
    q, out = runs[4]
    blk = q.model.blocks[0]
    final = q.model.fc_norm if family == "eva02" else q.model.norm  # EVA-02 pools, then normalises
    assert type(blk.norm1) is RMSNorm and type(final) is RMSNorm
    if family == "eva02":
        assert blk.gamma_1 is None and isinstance(blk.mlp.norm, OnlineRotation)
    assert_checkpoint_round_trip(q, m, x, tmp_path, want=out)  # the W4A4 model
    pytest.importorskip("onnxruntime")
    from ptq4vit.export import export_onnx
    rep = export_onnx(q, tmp_path / "qdq.onnx", format="qdq", input_size=(3, 32, 32))
    assert (len(rep.sites), sum(s.integer for s in rep.sites)) == ROTQ_EXPORT[family]


# ---------------------------------------------------------------- 3. checkpoint round trip


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_checkpoint_round_trip_is_bit_identical(family, tmp_path):
    model, x = make(family)
    q = fast_quantize(model, x)
    # what quantize records before wrapping (the wrapped BEiT/EVA/Swin V2 attention holds its q/k/v biases as
    # the qkv site's bias, so the float weights are identified on the float model)
    q.float_weights_sha256 = ptq4vit.checkpoint.float_weights_digest(model)
    assert_checkpoint_round_trip(q, model, x, tmp_path)


# ---------------------------------------------------------------- 4. integer ONNX export

#: Integer sites of the tiny models: every site but the patch-embedding conv (its input is the float image).
INTEGER_SITES = {"beit": 13, "swinv2": 26, "eva02": 13, "eva02-base-layout": 19, "siglip": 20}
#: OpenVINO's integer layers minus the integer products of the QDQ graph (a twin site is two products), where
#: they differ: EVA's q @ kᵀ, whose operands come out of the float rotary embedding, runs in f32 there (2
#: blocks); Swin V2's patch-merging reduction runs as two integer FullyConnected layers.
OPENVINO_DIFFERENCE = {"eva02": -2, "eva02-base-layout": -2, "swinv2": 1}


@pytest.mark.parametrize("family", sorted(INTEGER_SITES))
def test_integer_export_runs_on_onnx_runtime_and_openvino(family, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    model, x = make(family)
    q = fast_quantize(model, x)
    with torch.no_grad():
        ref = q(x).numpy()
    for fmt, rep, out in run_on_onnx_runtime(q, x, tmp_path):
        assert sum(s.integer for s in rep.sites) == INTEGER_SITES[family] == len(q.sites()) - 1
        assert [s.name for s in rep.fallbacks] == ["patch_embed.proj"]
        # the logits stay within 2% of the torch model's range
        assert within(out, ref, 0.02), fmt
    out, integer = run_on_openvino(tmp_path / "qdq.onnx", x)
    if OPENVINO_INT8_EXACT:
        assert within(out, ref, 0.02)
    assert integer == integer_products(rep) + OPENVINO_DIFFERENCE.get(family, 0)


# ---------------------------------------------------------------- 5. names


ZOO_NAMES = {"BEiT-B/224": "beit_base_patch16_224", "SwinV2-T/256": "swinv2_tiny_window8_256",
             "EVA02-Ti/336": "eva02_tiny_patch14_336", "SigLIP-B/224": "vit_base_patch16_siglip_224"}


def test_models_command_lists_the_families(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for short, arch in ZOO_NAMES.items():
        assert short in out and arch in out
        assert zoo.resolve(short).timm_name.partition(".")[0] == arch


@pytest.mark.parametrize("short", sorted(ZOO_NAMES))
def test_the_command_line_quantizes_a_family_by_its_short_name(short, tmp_path, cifar_dir):
    import json
    kwargs = {"beit_base_patch16_224": TINY, "eva02_tiny_patch14_336": TINY, "vit_base_patch16_siglip_224": TINY,
              "swinv2_tiny_window8_256": FAMILIES["swinv2"][1]}[ZOO_NAMES[short]]
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    if "siglip" in ZOO_NAMES[short]:
        kwargs = dict(kwargs, num_classes=10)
    rc = main(["quantize", "--model", short, "--model-kwargs", json.dumps(kwargs), "--random-init",
               "--data", str(cifar_dir), "--val-split", "test", "--calib-dir", str(cifar_dir / "calib"),
               "--limit", "1", "--workers", "0", "--no-progress", "--set", "n_candidates=4", "--set", "rounds=1",
               "--calib-size", "4", "--bits", "W8A8", "--preset", "base", "--out", str(tmp_path / "runs")])
    assert rc == 0
    rows = [json.loads(line) for line in (tmp_path / "runs" / "results.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == [short]

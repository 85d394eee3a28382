"""Quantized checkpoints: bit-identical round trips and clear errors for anything else."""
import json
import os
import struct

import pytest
import torch
import timm

import ptq4vit
from ptq4vit import checkpoint as ck
from ptq4vit.checkpoint import CheckpointError
from ptq4vit.errors import UserError
from ptq4vit.models import insert_quant_sites
from ptq4vit.presets import get_preset
from ptq4vit.quantized import QuantizedModel

from _fastq import fast_quantize  # scales from absolute maxima: a checkpoint must keep whatever scales it gets

#: a short real calibration, for the one test that goes through ptq4vit.quantize
QUICK = dict(progress=False, n_candidates=4, rounds=1, metric="mse")

MODELS = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, num_classes=10)),
    "dinov2": ("vit_small_patch14_dinov2", dict(img_size=28, depth=1, num_classes=10)),
    "deit": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, depth=1, num_classes=10)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, depths=(1, 1), num_heads=(2, 4), window_size=4,
                                                  embed_dim=32, num_classes=10)),
}


def float_model(key="vit", seed=0, **over):
    name, kw = MODELS[key]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **{**kw, **over}).eval()


def images(model, n=4, seed=1):
    s = model.patch_embed.img_size
    return torch.randn(n, 3, *s, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vit_q():
    m = float_model("vit")
    return m, fast_quantize(m, images(m), "ptq4vit", 8, 8)


@pytest.fixture
def saved(vit_q, tmp_path):
    m, q = vit_q
    path = tmp_path / "q.safetensors"
    ck.save(q, path)
    return m, q, path


@pytest.mark.parametrize("key,preset,bits", [("vit", "ptq4vit", 8), ("dinov2", "ptq4vit", 6), ("deit", "official", 8),
                                             ("swin", "ptq4vit", 8), ("vit", "base", 4), ("vit", "ptq4vit+top", 4)])
def test_round_trip_is_bit_identical(key, preset, bits, tmp_path):
    m = float_model(key)
    top = preset.endswith("+top")  # the softmax twin with a top: one more tensor per attention
    if top:
        preset = get_preset(preset[:-4], softmax_twin_top=True)
    q = fast_quantize(m, images(m), preset, bits, bits)
    assert any(k.endswith("matmul2.a_quant.top") for k in q.model.state_dict()) == top
    path = tmp_path / "q.safetensors"
    meta = ck.save(q, path)
    q2 = ptq4vit.load(path)
    x = images(m, 6, seed=5)
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))
    assert q2.name == q.name and q2.preset == q.preset and (q2.w_bits, q2.a_bits) == (bits, bits)
    assert q2.qparams() == q.qparams()
    assert meta["float_weights_sha256"] == ck.float_weights_digest(m)


def test_round_trip_after_real_calibration(tmp_path):
    m = float_model("vit", depth=1)
    q = ptq4vit.quantize(m, images(m), "ptq4vit", 8, 8, **QUICK)
    ck.save(q, tmp_path / "q.safetensors")
    q2 = ptq4vit.load(tmp_path / "q.safetensors")
    x = images(m, 5, seed=8)
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))


def test_file_holds_int8_codes_and_self_description(saved):
    from safetensors import safe_open
    m, q, path = saved
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["ptq4vit"])
        for site in ("blocks.0.attn.qkv", "blocks.1.mlp.fc2", "head", "patch_embed.proj"):
            codes = f.get_tensor(site + ".weight_codes")
            assert codes.dtype == torch.int8
            assert site + ".weight" not in keys  # no float copy of a quantized weight
        assert f.get_tensor("blocks.0.attn.matmul2.a_quant.split").dtype == torch.float32
        assert "blocks.0.mlp.fc2.a_quant.neg_scale" in keys
    assert meta["model"]["name"] == q.name == "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    assert meta["model"]["architecture"] == "vit_tiny_patch16_224"
    assert meta["model"]["tag"] == "augreg_in21k_ft_in1k"
    assert meta["model"]["create_kwargs"]["depth"] == 2 and meta["model"]["create_kwargs"]["num_classes"] == 10
    assert meta["preset"]["name"] == "ptq4vit" and meta["preset"]["gelu_pow2"] is True
    assert (meta["w_bits"], meta["a_bits"]) == (8, 8)
    assert meta["float_weights_sha256"] == ck.float_weights_digest(m)
    assert meta["quantized_weights"]["blocks.0.attn.qkv"]["groups"] == 3


def test_low_bit_codes_stay_in_range(tmp_path):
    from safetensors.torch import load_file
    m = float_model("vit")
    q = fast_quantize(m, images(m), "ptq4vit", 4, 4)
    ck.save(q, tmp_path / "q.safetensors")
    t = load_file(tmp_path / "q.safetensors")
    for k, v in t.items():
        if k.endswith(".weight_codes"):
            assert v.min() >= -8 and v.max() <= 7


def test_load_onto_the_float_model(saved):
    m, q, path = saved
    q2 = ptq4vit.load(path, model=m)
    x = images(m, 3, seed=7)
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))
    assert m.blocks[0].attn.__class__.__name__ == "Attention"  # the given model is not modified


def test_load_onto_other_weights_is_refused(saved):
    _, _, path = saved
    with pytest.raises(CheckpointError, match="other float weights"):
        ptq4vit.load(path, model=float_model("vit", seed=1))


def test_load_onto_other_architecture_is_refused(saved):
    _, _, path = saved
    with pytest.raises(CheckpointError, match="other float weights"):
        ptq4vit.load(path, model=float_model("vit", depth=1))


def test_truncated_file(saved, tmp_path):
    _, _, path = saved
    data = path.read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 20, 4):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated|not a safetensors"):
            ptq4vit.load(bad)


def test_tampered_tensor(saved, tmp_path):
    _, _, path = saved
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # one bit of the last tensor
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="modified after it was saved"):
        ptq4vit.load(bad)


def test_tampered_scale_with_consistent_file(saved, tmp_path):
    """A well-formed safetensors file whose scale was changed (and re-saved) is still caught."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    _, _, path = saved
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["blocks.0.attn.qkv.a_quant.scale"] = tensors["blocks.0.attn.qkv.a_quant.scale"] * 1.01
    save_file(tensors, tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(CheckpointError, match="modified"):
        ptq4vit.load(tmp_path / "bad.safetensors")
    meta2 = dict(meta)
    meta2["ptq4vit"] = meta["ptq4vit"].replace('"w_bits": 8', '"w_bits": 6')
    with safe_open(path, "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys()}, tmp_path / "bad2.safetensors", metadata=meta2)
    with pytest.raises(CheckpointError, match="modified"):
        ptq4vit.load(tmp_path / "bad2.safetensors")


def test_wrong_formats(tmp_path):
    from safetensors.torch import save_file
    plain = tmp_path / "float.safetensors"
    save_file({k: v.contiguous() for k, v in float_model("vit").state_dict().items()}, plain)
    with pytest.raises(CheckpointError, match="not a ptq4vit checkpoint"):
        ptq4vit.load(plain)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        ptq4vit.load(text)
    with pytest.raises(CheckpointError, match="does not exist"):
        ptq4vit.load(tmp_path / "missing.safetensors")
    header = json.dumps({"__metadata__": {"ptq4vit": json.dumps({"format": "ptq4vit-checkpoint", "format_version": 99})}}).encode()
    future = tmp_path / "future.safetensors"
    future.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match="format version 99"):
        ptq4vit.load(future)


def test_refusals_reach_callers_as_user_errors(saved, tmp_path):
    _, _, path = saved
    for bad in (tmp_path / "missing.safetensors", tmp_path / "cut.safetensors"):
        if bad.name == "cut.safetensors":
            bad.write_bytes(path.read_bytes()[:100])
        with pytest.raises(UserError):
            ptq4vit.load(bad)


def test_save_refuses_uncalibrated_and_float(tmp_path):
    m = float_model("vit")
    insert_quant_sites(m, get_preset("ptq4vit"), 8, 8)
    with pytest.raises(CheckpointError, match="uncalibrated"):
        ck.save(QuantizedModel(m, get_preset("ptq4vit"), 8, 8, "x"), tmp_path / "q.safetensors")
    with pytest.raises(CheckpointError, match="QuantizedModel"):
        ck.save(float_model("vit"), tmp_path / "q.safetensors")
    assert not os.path.exists(tmp_path / "q.safetensors")


def test_float_digest_identifies_weights(vit_q):
    m, q = vit_q
    assert ck.float_weights_digest(m) == ck.float_weights_digest(q)
    assert ck.float_weights_digest(m) != ck.float_weights_digest(float_model("vit", seed=3))


def test_data_config_is_stored(vit_q, tmp_path):
    _, q = vit_q
    cfg = {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "squash",
           "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    ck.save(q, tmp_path / "q.safetensors", data_config=cfg)
    meta = ck.read_metadata(tmp_path / "q.safetensors")
    assert ck.data_config(meta) == cfg


# ---- models whose head is not "final norm, then class token" (the rebuild arguments must say so)

POOLED = {
    "avg_pool_fc_norm": dict(global_pool="avg"),
    "avg_pool_no_fc_norm": dict(global_pool="avg", fc_norm=False),
    "no_class_token": dict(class_token=False, global_pool="avg"),
    "no_final_norm": dict(final_norm=False),
    "registers_layerscale": dict(reg_tokens=2, init_values=1e-6, no_embed_class=True),
}


@pytest.mark.parametrize("variant", sorted(POOLED))
def test_pooled_and_token_free_vits_round_trip(variant, tmp_path):
    import inspect
    from timm.models.vision_transformer import VisionTransformer
    missing = set(POOLED[variant]) - set(inspect.signature(VisionTransformer.__init__).parameters)
    if missing:  # the dependency-floor run (scripts/test_min_deps.sh): an older timm cannot build this variant
        pytest.skip(f"timm {timm.__version__} has no VisionTransformer argument {sorted(missing)}")
    m = float_model("vit", depth=1, **POOLED[variant])
    q = fast_quantize(m, images(m), "ptq4vit", 8, 8)
    meta = ptq4vit.save(q, tmp_path / "q.safetensors")
    for key, value in POOLED[variant].items():
        if key != "init_values":  # only whether LayerScale exists can be read off; gamma comes from the file
            assert meta["model"]["create_kwargs"].get(key, value) == value
    q2 = ptq4vit.load(tmp_path / "q.safetensors")
    x = images(m, 3, seed=4)
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))


def test_half_precision_model_reloads_bit_identically(tmp_path):
    """Weight codes are computed as the bf16 forward computes them (rounding in fp32 would move some codes)."""
    m = float_model("vit")
    q = fast_quantize(m, images(m), "ptq4vit", 8, 8).to(torch.bfloat16)
    ptq4vit.save(q, tmp_path / "q.safetensors")
    q2 = ptq4vit.load(tmp_path / "q.safetensors")
    assert q2.model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    x = images(m, 3, seed=4).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))


# ---- what the structure check compares

def test_a_new_harmless_timm_attribute_does_not_orphan_checkpoints(saved, monkeypatch):
    """A timm release that adds attributes to its modules (class and instance) still loads old checkpoints."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import Block
    m, q, path = saved
    original_init = Block.__init__

    def init_with_new_attributes(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.use_new_kernel = False      # an instance attribute a newer timm might add
        self.attn.fused_attn = not self.attn.fused_attn

    monkeypatch.setattr(Block, "__init__", init_with_new_attributes)
    monkeypatch.setattr(Mlp, "some_new_option", 3, raising=False)
    q2 = ptq4vit.load(path)
    assert q2.model.blocks[0].use_new_kernel is False  # the patched timm really built the model
    # the strict per-attribute comparison, as a digest of it stored in format 1 files, would have refused it
    assert ck._architecture_lines(q2.model) != ck._architecture_lines(q.model)
    x = images(m, 3, seed=6)
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))


def test_a_timm_release_that_changes_the_computation_is_refused(saved, monkeypatch):
    from timm.models.vision_transformer import Block, LayerScale  # (timm.layers has LayerScale only since 1.0.1x)
    _, _, path = saved
    original_init = Block.__init__

    def init_with_layer_scale(self, dim, *args, **kwargs):
        original_init(self, dim, *args, **kwargs)
        self.ls1 = LayerScale(dim, init_values=1.0)

    monkeypatch.setattr(Block, "__init__", init_with_layer_scale)
    with pytest.raises(CheckpointError, match=r"extra tensor 'blocks.0.ls1.gamma' \(and 1 more\)"):
        ptq4vit.load(path)


def test_structure_names_sites_and_quantizer_kinds(vit_q):
    _, q = vit_q
    st = ck.structure(q)
    assert st["tensors"]["blocks.0.attn.qkv.weight"] == ["float32", [576, 192]]
    assert st["tensors"]["blocks.0.attn.qkv.w_quant.scale"] == ["float32", [3]]
    assert st["sites"]["blocks.0.attn.qkv"] == {
        "type": "QuantLinear", "w_quant": {"type": "UniformQuantizer", "bits": 8, "groups": 3, "axis": 0},
        "a_quant": {"type": "UniformQuantizer", "bits": 8, "groups": 1, "axis": None}}
    assert st["sites"]["blocks.1.attn.matmul2"]["a_quant"] == {"type": "TwinSoftmaxQuantizer", "bits": 8, "form": "select"}
    assert st["sites"]["blocks.1.mlp.fc2"]["a_quant"] == {"type": "TwinGeluQuantizer", "bits": 8, "pow2": True}
    changed = json.loads(json.dumps(st))
    changed["sites"]["blocks.1.mlp.fc2"]["a_quant"]["pow2"] = False
    assert ck._structure_difference(st, changed) == (
        "quantization site 'blocks.1.mlp.fc2' is {'type': 'QuantLinear', 'w_quant': {'type': 'UniformQuantizer', "
        "'bits': 8, 'groups': 1, 'axis': None}, 'a_quant': {'type': 'TwinGeluQuantizer', 'bits': 8, 'pow2': False}} in "
        "the rebuilt model, {'type': 'QuantLinear', 'w_quant': {'type': 'UniformQuantizer', 'bits': 8, 'groups': 1, "
        "'axis': None}, 'a_quant': {'type': 'TwinGeluQuantizer', 'bits': 8, 'pow2': True}} in the checkpoint")
    assert ck._structure_difference(st, st) is None


def test_format_1_checkpoints_still_load(saved, tmp_path):
    """Files written before the structure was stored as data (a digest of timm internals instead) load unchanged."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    m, q, path = saved
    with safe_open(path, "pt") as f:
        file_meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(file_meta["ptq4vit"])
    del meta["structure"]
    meta.update(format_version=1, structure_sha256="0" * 64)
    meta_json = json.dumps(meta, sort_keys=True)
    old = tmp_path / "v1.safetensors"
    save_file(tensors, old, metadata={"format": "pt", "ptq4vit": meta_json,
                                      "ptq4vit_content_sha256": ck.content_digest(meta_json, tensors)})
    q2 = ptq4vit.load(old)
    x = images(m, 3, seed=2)
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))


def test_data_config_without_a_stored_one_is_timms(saved):
    _, _, path = saved
    cfg = ck.data_config(ck.read_metadata(path))
    assert cfg["input_size"] == (3, 32, 32)  # the checkpoint's img_size, not the pretrained 224
    assert cfg["interpolation"] == "bicubic" and cfg["mean"] == (0.5, 0.5, 0.5)  # vit_tiny augreg's config

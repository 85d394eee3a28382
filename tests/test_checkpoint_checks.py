"""Checkpoints that are well-formed safetensors files with a correct content digest, but whose
content is not sense: refused by name at save and at load, before timm builds anything."""
import copy
import json
import math

import pytest
import torch

import ptq4vit
from ptq4vit import checkpoint as ck
from ptq4vit.checkpoint import CheckpointError

from _fastq import fast_quantize
from test_checkpoint import float_model, images


@pytest.fixture(scope="module")
def vit_q():
    m = float_model("vit", depth=1)
    return fast_quantize(m, images(m), "ptq4vit", 8, 8)


@pytest.fixture(scope="module")
def good(vit_q, tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "q.safetensors"
    ck.save(vit_q, path, data_config={"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 1.0,
                                      "crop_mode": "center", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})
    return path


def rewrite(src, dst, meta_edit=None, tensor_edit=None):
    """A copy of ``src`` with its metadata and tensors edited and the content digest recomputed, so
    that only a check of the content itself can catch the change."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(src, "pt") as f:
        meta = json.loads(f.metadata()["ptq4vit"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta_edit:
        meta_edit(meta)
    if tensor_edit:
        tensor_edit(tensors)
    meta_json = json.dumps(meta, sort_keys=True)
    save_file(tensors, dst, metadata={"format": "pt", "ptq4vit": meta_json,
                                      "ptq4vit_content_sha256": ck.content_digest(meta_json, tensors)})
    return dst


def test_rewrite_alone_keeps_a_loadable_file(good, tmp_path):
    """(The crafting helper itself changes nothing that load would notice.)"""
    ptq4vit.load(rewrite(good, tmp_path / "same.safetensors"))


# ---- scales that are not finite and positive

NOT_FINITE_OR_POSITIVE = [
    ("blocks.0.attn.qkv.a_quant.scale", 0, float("nan"), "1 of 1 values that are not finite"),
    ("blocks.0.attn.qkv.w_quant.scale", 1, float("inf"), "1 of 3 values that are not finite"),
    ("blocks.0.mlp.fc2.a_quant.neg_scale", None, float("-inf"), "1 of 1 values that are not finite"),
    ("blocks.0.attn.matmul2.a_quant.split", None, 0.0, "1 of 1 values that are not > 0"),
    ("head.w_quant.scale", 0, -0.5, "1 of 1 values that are not > 0"),
]


def _set(t, index, value):
    t = t.clone()
    if index is None:
        t.fill_(value)
    else:
        t[index] = value
    return t


@pytest.mark.parametrize("key,index,value,words", NOT_FINITE_OR_POSITIVE)
def test_save_refuses_scales_that_are_not_finite_and_positive(vit_q, tmp_path, key, index, value, words):
    q = copy.deepcopy(vit_q)
    buf = q.model.get_submodule(key.rpartition(".")[0])
    name = key.rpartition(".")[2]
    setattr(buf, name, _set(getattr(buf, name), index, value))
    with pytest.raises(CheckpointError, match=f"{key} has {words}"):
        ck.save(q, tmp_path / "q.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key,index,value,words", NOT_FINITE_OR_POSITIVE)
def test_load_refuses_scales_that_are_not_finite_and_positive(good, tmp_path, key, index, value, words):
    def edit(tensors):
        tensors[key] = _set(tensors[key], index, value)
    bad = rewrite(good, tmp_path / "bad.safetensors", tensor_edit=edit)
    with pytest.raises(CheckpointError, match=f"{key} has {words}"):
        ptq4vit.load(bad)


# ---- metadata that disagrees with the tensors

def _claim_bits(meta, bits):
    """Rewrite every record of the weight bits, consistently, to ``bits``."""
    meta["w_bits"] = bits
    for entry in meta["quantized_weights"].values():
        entry["bits"] = bits
    for site in meta["structure"]["sites"].values():
        if "w_quant" in site:
            site["w_quant"]["bits"] = bits


def test_fewer_recorded_bits_than_the_codes_use(good, tmp_path):
    bad = rewrite(good, tmp_path / "w4.safetensors", meta_edit=lambda m: _claim_bits(m, 4))
    with pytest.raises(CheckpointError, match=r"the weight codes of patch_embed.proj lie outside the range of their "
                                              r"recorded 4 bits \(\[-8, 7\]\): \d+ of 36864 values"):
        ptq4vit.load(bad)


def _set_quantized(site, key, value):
    def edit(meta):
        meta["quantized_weights"][site][key] = value
    return edit


def _set_tensor_entry(key, entry):
    def edit(meta):
        meta["structure"]["tensors"][key] = entry
    return edit


def _set_preset(key, value):
    def edit(meta):
        meta["preset"][key] = value
    return edit


def _halve_scale_precision(tensors):
    tensors["blocks.0.attn.qkv.a_quant.scale"] = tensors["blocks.0.attn.qkv.a_quant.scale"].half()


def _codes_as_int16(tensors):
    tensors["head.weight_codes"] = tensors["head.weight_codes"].to(torch.int16)


METADATA_DISAGREES = {
    "bits above 8": (lambda m: _claim_bits(m, 9), None, "metadata w_bits must be an integer from 2 to 8, got 9"),
    "a_bits a string": (lambda m: m.update(a_bits="8"), None, "metadata a_bits must be an integer from 2 to 8"),
    "recorded groups": (_set_quantized("head", "groups", 2), None,
                        r"the recorded quantized weight head is .*.groups.: 2"),
    "recorded bits of one site": (_set_quantized("head", "bits", 1), None,
                                  "the recorded weight bits of head must be an integer from 2 to 8, got 1"),
    "scale dtype": (None, _halve_scale_precision,
                    r"tensor 'blocks.0.attn.qkv.a_quant.scale' is float16 \[1\], the metadata records float32 \[1\]"),
    "codes dtype": (None, _codes_as_int16, r"tensor 'head.weight_codes' is int16 \[10, 192\], the metadata records "
                                           r"int8 \[10, 192\]"),
    "scale shape": (_set_tensor_entry("blocks.0.attn.qkv.w_quant.scale", ["float32", [4]]), None,
                    r"tensor 'blocks.0.attn.qkv.w_quant.scale' is float32 \[3\], the metadata records float32 \[4\]"),
    "structure dtype name": (_set_tensor_entry("norm.weight", ["load", [192]]), None,
                             "metadata structure entry of tensor 'norm.weight' must be"),
    "preset int as a string": (_set_preset("n_candidates", "5"), None,
                               r"preset field n_candidates must be an int, got '5' \(str\)"),
    "preset bool as a string": (_set_preset("softmax_renorm", "false"), None,
                                r"preset field softmax_renorm must be True or False, got 'false' \(str\)"),
    "preset choice": (_set_preset("metric", "l1"), None,
                      r"preset field metric must be one of 'cosine', 'mse', 'hessian', got 'l1' \(str\)"),
    "preset float NaN": (_set_preset("alpha", float("nan")), None, "preset field alpha must be a finite number"),
    "preset float as a string": (_set_preset("alpha", "0.5"), None,
                                 r"preset field alpha must be a finite number, got '0.5' \(str\)"),
    "preset unknown field": (_set_preset("colour", "red"), None,
                             r"the preset has fields this ptq4vit does not know \(colour\); upgrade ptq4vit"),
    "float digest": (lambda m: m.update(float_weights_sha256=["x"]), None, "float_weights_sha256 must be 64 hex"),
}


@pytest.mark.parametrize("case", sorted(METADATA_DISAGREES))
def test_metadata_that_disagrees_with_the_tensors_is_refused_by_name(good, tmp_path, case):
    meta_edit, tensor_edit, words = METADATA_DISAGREES[case]
    bad = rewrite(good, tmp_path / "bad.safetensors", meta_edit=meta_edit, tensor_edit=tensor_edit)
    with pytest.raises(CheckpointError, match=words):
        ptq4vit.load(bad)


def test_a_json_integer_for_a_float_preset_field_loads_as_that_float(vit_q, good, tmp_path):
    """JSON writers may drop a float's ".0": the preset loaded is the one saved, bit for bit."""
    assert vit_q.preset.smooth_alpha == 0.0  # (the edit below writes the same number as the integer 0)
    same = rewrite(good, tmp_path / "int.safetensors", meta_edit=_set_preset("smooth_alpha", 0))
    q1, q2 = ptq4vit.load(good), ptq4vit.load(same)
    assert type(q2.preset.smooth_alpha) is float and q2.preset == q1.preset == vit_q.preset
    x = images(vit_q.model, 3, seed=4)
    with torch.no_grad():
        assert torch.equal(q1(x), q2(x))
    assert q2.qparams() == q1.qparams()


# ---- nothing in the metadata reaches timm but architecture arguments of a supported family

@pytest.fixture
def no_foreign_file_reads(monkeypatch):
    """Fails the test if anything calls torch.load (timm's checkpoint_path loader does)."""
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    yield calls
    assert calls == []


def _set_kwarg(key, value):
    def edit(meta):
        meta["model"]["create_kwargs"][key] = value
    return edit


def test_checkpoint_path_in_the_metadata_is_refused_without_reading_it(vit_q, good, tmp_path, no_foreign_file_reads):
    other = tmp_path / "other.pth"
    torch.save(vit_q.model.state_dict(), other)
    bad = rewrite(good, tmp_path / "bad.safetensors", meta_edit=_set_kwarg("checkpoint_path", str(other)))
    with pytest.raises(CheckpointError, match="argument 'checkpoint_path' is not an architecture argument"):
        ptq4vit.load(bad)


NOT_ARCHITECTURE = {
    "pretrained": True, "pretrained_cfg": {"file": "/etc/hostname"}, "pretrained_cfg_overlay": {"file": "x.pth"},
    "features_only": True, "pretrained_strict": False, "cache_dir": "/tmp", "act_layer": "gelu", "unknown_key": 1,
}


@pytest.mark.parametrize("key", sorted(NOT_ARCHITECTURE))
def test_non_architecture_create_kwargs_are_refused(good, tmp_path, key, no_foreign_file_reads):
    bad = rewrite(good, tmp_path / "bad.safetensors", meta_edit=_set_kwarg(key, NOT_ARCHITECTURE[key]))
    with pytest.raises(CheckpointError, match=f"argument '{key}' is not an architecture argument"):
        ptq4vit.load(bad)


WRONG_TYPE = {
    "depth": ("1", "a positive integer"), "embed_dim": (19.5, "a positive integer"),
    "num_classes": (True, "an integer >= 0"), "img_size": ({"h": 32}, "a positive integer or a list of two"),
    "patch_size": ([8, 8, 8], "a positive integer or a list of two"), "mlp_ratio": (float("nan"), "a positive number"),
    "qkv_bias": ("false", "true or false"), "init_values": ("1e-5", "a number or null"),
    "global_pool": ("../x", "one of"), "fc_norm": (0, "true, false or null"), "reg_tokens": (-1, "an integer >= 0"),
}


@pytest.mark.parametrize("key", sorted(WRONG_TYPE))
def test_create_kwargs_of_the_wrong_type_are_refused(good, tmp_path, key, no_foreign_file_reads):
    value, expected = WRONG_TYPE[key]
    bad = rewrite(good, tmp_path / "bad.safetensors", meta_edit=_set_kwarg(key, value))
    with pytest.raises(CheckpointError, match=f"argument '{key}' must be {expected}"):
        ptq4vit.load(bad)


def _set_model(**fields):
    def edit(meta):
        meta["model"].update(fields)
    return edit


CRAFTED_MODEL = {
    "another family": (dict(name="resnet18", architecture="resnet18", tag=None), "'resnet18' .* has no ptq4vit adapter"),
    "hybrid vit": (dict(name="vit_base_r50_s16_224", architecture="vit_base_r50_s16_224", tag=None),
                   "has no ptq4vit adapter"),
    "hub name": (dict(name="hf-hub:timm/vit_tiny_patch16_224"), "is not a timm model name"),
    "local folder": (dict(name="local-dir:/tmp"), "is not a timm model name"),
    "not a string": (dict(name=["vit_tiny_patch16_224"]), "is not a timm model name"),
    "unknown name": (dict(name="vit_gigantic_patch1", architecture=None, tag=None), "not a model name timm"),
    "unknown tag": (dict(name="vit_tiny_patch16_224.evil", tag="evil"), "timm knows no tag 'evil'"),
    "architecture field": (dict(architecture="resnet18"), "model architecture 'resnet18' disagrees with the model name"),
    "tag field": (dict(tag="in1k"), "model tag 'in1k' disagrees with the model name"),
    "dtype": (dict(dtype="load"), "metadata model dtype 'load' is not one of"),
    "create_kwargs not an object": (dict(create_kwargs=["depth", 1]), "create_kwargs must be an object"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED_MODEL))
def test_model_names_without_an_adapter_are_refused_before_timm_builds_them(good, tmp_path, case, monkeypatch,
                                                                           no_foreign_file_reads):
    import timm
    fields, words = CRAFTED_MODEL[case]
    built = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: built.append(a))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bad = rewrite(good, tmp_path / "bad.safetensors", meta_edit=_set_model(**fields))
    with pytest.raises(CheckpointError, match=words):
        ptq4vit.load(bad)
    assert built == []


DATA_CONFIG = {
    "unknown key": ({"transform": "x"}, "data_config key 'transform' is not one of"),
    "input size": ({"input_size": [3, 32]}, "data_config input_size must be three positive integers"),
    "interpolation": ({"interpolation": 3}, "data_config interpolation must be one of"),
    "std zero": ({"std": [0.5, 0.0, 0.5]}, "data_config std must be a list of finite numbers"),
    "crop_pct": ({"crop_pct": "1"}, r"data_config crop_pct must be a number in \(0, 10\]"),
    "crop_mode": ({"crop_mode": "evil"}, "data_config crop_mode must be one of"),
}


@pytest.mark.parametrize("case", sorted(DATA_CONFIG))
def test_crafted_data_configs_are_refused_where_the_metadata_is_read(good, tmp_path, case):
    change, words = DATA_CONFIG[case]
    bad = rewrite(good, tmp_path / "bad.safetensors", meta_edit=lambda m: m["data_config"].update(change))
    with pytest.raises(CheckpointError, match=words):
        ck.read_metadata(bad)  # what `ptq4vit eval --checkpoint` reads the eval transform from
    with pytest.raises(CheckpointError, match=words):
        ptq4vit.load(bad)


def test_save_refuses_what_load_would_refuse(vit_q, tmp_path):
    with pytest.raises(CheckpointError, match="argument 'checkpoint_path' is not an architecture argument"):
        ck.save(vit_q, tmp_path / "q.safetensors", create_kwargs={"checkpoint_path": "x.pth"})
    with pytest.raises(CheckpointError, match="data_config key 'transform' is not one of"):
        ck.save(vit_q, tmp_path / "q.safetensors", data_config={"transform": "x"})
    with pytest.raises(CheckpointError, match="data_config crop_pct must be"):
        ck.save(vit_q, tmp_path / "q.safetensors", data_config={"crop_pct": math.inf})
    assert list(tmp_path.iterdir()) == []


def test_the_adapters_declare_every_argument_they_read_off_a_model():
    """What save derives is exactly what load lets through (for both families)."""
    from test_checkpoint import MODELS
    from ptq4vit.models import DEFAULT_ADAPTERS
    for key in ("vit", "deit", "swin", "dinov2"):
        m = float_model(key)
        adapter = DEFAULT_ADAPTERS.adapter_for(m)
        assert adapter is DEFAULT_ADAPTERS.adapter_for_name(MODELS[key][0])
        assert set(adapter.create_kwargs(m)) == set(adapter.create_args)


def test_every_torch_load_in_the_repository_is_weights_only():
    """Unpickling runs code: every torch.load passes weights_only=True (tensors and plain containers only)."""
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    unsafe, seen = [], 0
    for folder in ("ptq4vit", "benchmarks", "tests", "examples", "scripts"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                    seen += 1
                    if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                               for k in node.keywords):
                        unsafe.append(f"{path.relative_to(root)}:{node.lineno}")
    assert seen >= 3 and unsafe == []

"""torchvision's VisionTransformer (nn.MultiheadAttention blocks), at a tiny size with random weights:
float equivalence, calibration with each preset, checkpoint round trip, integer export, CLI names."""
import copy

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import VisionTransformer
from torchvision.models.vision_transformer import ConvStemConfig

import ptq4vit
from ptq4vit import UnsupportedModelError
from ptq4vit.models import DEFAULT_ADAPTERS, AdapterRegistry, SwinAdapter, VitAdapter, insert_quant_sites
from ptq4vit.models.torchvision_vit import QuantMultiheadAttention
from ptq4vit.presets import get_preset
from ptq4vit.transforms import OnlineRotation, RMSNorm

from _family_checks import (OPENVINO_INT8_EXACT, FAST, assert_checkpoint_round_trip, assert_crafted_torchvision_checkpoint_refused,
                            assert_refused_untouched, calibrate_at_w8a8_and_w4a4, integer_products, move_off_init,
                            random_images, rel, rotq_switched_off, run_on_onnx_runtime, run_on_openvino, unquantized)

TINY_VIT = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=48, mlp_dim=96, num_classes=10)
#: |wrapped - torchvision| / max|torchvision| with quantization off: the attention runs in timm's op order
#: (q @ kᵀ, then * scale, softmax, @ v), PyTorch's eval path in its own fused kernel. Measured at most
#: 5.2e-7 on five seeds, where PyTorch's own two eval paths (fused, without autograd; SDPA, with it)
#: differ by up to 6.8e-7 on the same models.
FLOAT_FLOOR = 1e-6


def tiny_vit(seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(**{**TINY_VIT, **kw}).eval()
    # torchvision zero-initialises the head; norms off the identity so that folding them matters
    return move_off_init(model, 0.3, names=("heads", ".ln"))


def images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return random_images(n, seed)


def _unquantized(model: nn.Module):
    return unquantized(model, "torchvision_VisionTransformer")


# ------------------------------------------------------------------ structure and refusals


def test_every_product_is_a_site():
    m = copy.deepcopy(tiny_vit())
    sites = insert_quant_sites(m, get_preset("ptq4vit"), 8, 8)
    block = [f"self_attention.{s}" for s in ("qkv", "matmul1", "matmul2", "out_proj")] + ["mlp.0", "mlp.3"]
    assert list(sites) == ["conv_proj", *[f"encoder.layers.encoder_layer_{i}.{s}" for i in range(2) for s in block],
                           "heads.head"]
    attn = m.encoder.layers.encoder_layer_0.self_attention
    assert isinstance(attn, QuantMultiheadAttention) and attn.qkv.w_quant.groups == 3  # one weight scale per q, k, v


def test_representation_layer_is_a_site_and_its_tanh_stays_float():
    m = tiny_vit(representation_size=16)
    sites = insert_quant_sites(copy.deepcopy(m), get_preset("ptq4vit"), 8, 8)
    assert list(sites)[-2:] == ["heads.pre_logits", "heads.head"]


def test_without_its_adapter_the_model_is_refused_by_name():
    timm_only = AdapterRegistry((VitAdapter(), SwinAdapter()))
    with pytest.raises(UnsupportedModelError, match=r"^model type torchvision\.models\.vision_transformer\.VisionTransformer "
                                                    r"is not supported; .* for timm\.models\.vision_transformer\."
                                                    r"VisionTransformer, "):
        ptq4vit.quantize(tiny_vit(), images(), "base", adapters=timm_only, **FAST)


REFUSED = {
    "conv stem": (lambda: tiny_vit(conv_stem_configs=[ConvStemConfig(8, 3, 2)]), "conv_proj",
                  "the convolutional stem"),
    "bias_kv": (lambda: _with_attention(add_bias_kv=True), "encoder.layers.encoder_layer_0.self_attention",
                "add_bias_kv"),
    "sequence first": (lambda: _with_attention(batch_first=False), "encoder.layers.encoder_layer_0.self_attention",
                       "batch_first=False"),
    "other mlp": (lambda: _with_mlp(), "encoder.layers.encoder_layer_0.mlp", "only torchvision's MLPBlock"),
}


def _with_attention(**kw):
    m = tiny_vit(num_layers=1)
    m.encoder.layers.encoder_layer_0.self_attention = nn.MultiheadAttention(48, 2, **{"batch_first": True, **kw})
    return m


def _with_mlp():
    m = tiny_vit(num_layers=1)
    m.encoder.layers.encoder_layer_0.mlp = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 48))
    return m


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unknown_layouts_are_refused_by_name_and_left_untouched(case):
    make, module, words = REFUSED[case]
    assert_refused_untouched(make(), lambda m: insert_quant_sites(m, get_preset("ptq4vit"), 8, 8),
                             f"^module '{module}' of type .*: .*{words}")


# ------------------------------------------------------------------ 1. float equivalence


def test_with_quantization_off_it_computes_what_torchvision_computes():
    for seed in range(3):
        m, x = tiny_vit(seed), images(seed=seed + 1)
        with torch.no_grad():
            ref = m(x)
            assert rel(_unquantized(m)(x), ref) < FLOAT_FLOOR
        # the floor is PyTorch's own: its two eval paths of nn.MultiheadAttention differ by as much
        assert 0 < rel(m(x).detach(), ref) < FLOAT_FLOOR


def test_attention_returns_multihead_attentions_output_and_weights():
    mha = nn.MultiheadAttention(48, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 48)
    out, w = mha(x, x, x, need_weights=True, average_attn_weights=False)
    m = tiny_vit(num_layers=1)
    m.encoder.layers.encoder_layer_0.self_attention = mha
    q = _unquantized(m).model.encoder.layers.encoder_layer_0.self_attention
    got, got_w = q(x, x, x, need_weights=True, average_attn_weights=False)
    assert (got - out).abs().max() < 1e-6 and (got_w - w).abs().max() < 1e-6
    assert q(x, x, x, need_weights=False)[1] is None


# ------------------------------------------------------------------ 2. calibration with each preset


@pytest.mark.parametrize("preset", ["ptq4vit", "rotq", "deploy8"])
def test_presets_calibrate_at_w8a8_and_w4a4(preset):
    _, errors = calibrate_at_w8a8_and_w4a4(tiny_vit(), images(8), preset, rel)
    assert errors[8] < errors[4]


def test_rotq_folds_into_the_packed_projection_and_keeps_the_float_function():
    q, got, ref = rotq_switched_off(tiny_vit(), images())
    block = q.model.encoder.layers.encoder_layer_0
    assert isinstance(block.ln_1, RMSNorm) and isinstance(block.mlp[2], OnlineRotation)
    assert isinstance(q.model.encoder.ln, RMSNorm)
    assert rel(got, ref) < 2 * FLOAT_FLOOR


# ------------------------------------------------------------------ 3. checkpoint round trip


def test_checkpoint_round_trip_is_bit_identical(tmp_path):
    m, x = tiny_vit(num_layers=1), images()
    meta = assert_checkpoint_round_trip(ptq4vit.quantize(m, x, "ptq4vit", **FAST), m, x, tmp_path)
    assert meta["model"]["name"] == "torchvision_VisionTransformer"
    assert meta["model"]["create_kwargs"] == dict(num_classes=10, image_size=32, patch_size=8, num_layers=1,
                                                  num_heads=2, hidden_dim=48, mlp_dim=96, dropout=0.0,
                                                  attention_dropout=0.0, representation_size=None)


@pytest.mark.parametrize("key,value,words", [("weights", "IMAGENET1K_V1", "argument 'weights' is not an architecture"),
                                             ("progress", True, "argument 'progress' is not an architecture"),
                                             ("norm_layer", "x", "argument 'norm_layer' is not an architecture"),
                                             ("dropout", 2.0, "argument 'dropout' must be a number from 0 to 1")])
def test_a_crafted_checkpoint_cannot_ask_for_weights_or_files(tmp_path, monkeypatch, key, value, words):
    q = ptq4vit.quantize(tiny_vit(num_layers=1), images(), "base", **FAST)
    assert_crafted_torchvision_checkpoint_refused(q, tmp_path, monkeypatch, key, value, words)


def test_builder_names_build_the_architecture_without_weights():
    adapter = DEFAULT_ADAPTERS.adapter_for_name("vit_b_32")
    with torch.device("meta"):
        m = adapter.create_model("vit_b_32", image_size=64, num_classes=3)
    assert type(m) is VisionTransformer and (m.patch_size, m.hidden_dim, len(m.encoder.layers)) == (32, 768, 12)


# ------------------------------------------------------------------ 4. integer export


def test_integer_export_runs_on_onnx_runtime_and_openvino(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from ptq4vit.export.ort import optimized_op_counts

    m, x = tiny_vit(), images(8)
    q = ptq4vit.quantize(m, x, "ptq4vit", **FAST)
    with torch.no_grad():
        want = q(x).numpy()
    for fmt, rep, got in run_on_onnx_runtime(q, x, tmp_path, input_size=(3, 32, 32)):
        # 2 blocks x (qkv, q@k, softmax@v, out_proj, mlp.0, mlp.3) + head in integers; the patch conv stays float
        assert sum(s.integer for s in rep.sites) == 13
        assert [s.name for s in rep.fallbacks] == ["conv_proj"]
        products = integer_products(rep)
        assert optimized_op_counts(str(tmp_path / f"{fmt}.onnx")).get("MatMulIntegerToFloat", 0) == products == 17
        assert np.mean(got.argmax(1) == want.argmax(1)) == 1.0
    pytest.importorskip("openvino")
    out, integer = run_on_openvino(tmp_path / "qdq.onnx", x)
    assert integer == 17
    if OPENVINO_INT8_EXACT:
        assert np.mean(out.argmax(1) == want.argmax(1)) == 1.0


# ------------------------------------------------------------------ 5. model names and the command line


def test_models_command_lists_the_torchvision_builders(capsys):
    from ptq4vit.harness.cli import main
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"):
        assert any(line.split()[:2] == [name, "(torchvision)"] for line in out.splitlines()), name


def test_builder_names_need_local_weights_and_build_nothing_from_a_hub():
    from ptq4vit.errors import UserError
    from ptq4vit.harness import zoo
    with pytest.raises(UserError, match="^model vit_b_16 has no hub weights: pass --weights FILE"):
        zoo.create("vit_b_16")
    lm = zoo.create("torchvision_VisionTransformer", pretrained=False, model_kwargs=TINY_VIT)
    assert type(lm.model) is VisionTransformer and lm.data_config["input_size"] == (3, 32, 32)


def test_local_weights_of_a_builder_name_load(tmp_path):
    from ptq4vit.harness import zoo
    m = tiny_vit()
    torch.save(m.state_dict(), tmp_path / "w.pth")
    lm = zoo.create("torchvision_VisionTransformer", weights=tmp_path / "w.pth", model_kwargs=TINY_VIT)
    with torch.no_grad():
        assert torch.equal(lm.model(images()), m(images()))


def test_cli_quantizes_and_saves_a_torchvision_vit(cifar_dir, tmp_path, capsys):
    import json

    from ptq4vit.harness.cli import main
    out = tmp_path / "run"
    assert main(["quantize", "--model", "torchvision_VisionTransformer", "--model-kwargs", json.dumps(TINY_VIT),
                 "--random-init", "--data", str(cifar_dir), "--val-split", "test", "--calib-dir",
                 str(cifar_dir / "calib"), "--limit", "3", "--workers", "0", "--no-progress", "--set",
                 "n_candidates=4", "--set", "rounds=1", "--calib-size", "8", "--bits", "W8A8", "--preset", "ptq4vit",
                 "--out", str(out), "--save", str(tmp_path / "q.safetensors")]) == 0
    assert ptq4vit.checkpoint.read_metadata(tmp_path / "q.safetensors")["model"]["name"] == "torchvision_VisionTransformer"


def test_a_refusal_names_the_module_where_class_names_clash():
    """timm's and torchvision's classes share names: a refusal names the module where they clash (here
    torchvision's SwinTransformer, in a registry without its adapter)."""
    from torchvision.models import SwinTransformer

    from ptq4vit.models.torchvision_swin import TorchvisionSwinAdapter
    swin = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2],
                           num_classes=10).eval()
    adapters = AdapterRegistry(a for a in DEFAULT_ADAPTERS.adapters if not isinstance(a, TorchvisionSwinAdapter))
    with pytest.raises(UnsupportedModelError, match=r"^model type torchvision\.models\.swin_transformer\.SwinTransformer "
                                                    r"is not supported; the adapter registry has adapters for "
                                                    r"timm\.models\.vision_transformer\.VisionTransformer, "
                                                    r"VisionTransformerDistilled, timm\.models\.swin_transformer\.SwinTransformer, "
                                                    r".*\btorchvision\.models\.vision_transformer\.VisionTransformer\b"):
        ptq4vit.quantize(swin, torch.randn(2, 3, 32, 32), "base", adapters=adapters, **FAST)

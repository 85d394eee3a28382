"""quantize(): end-to-end properties on tiny random-init ViT, DeiT (distilled) and Swin."""
import json
import threading

import pytest
import torch

import ptq4vit
import ptq4vit.calib.run as run_module
from ptq4vit.calib import capture, intra_op_threads
from ptq4vit.models import insert_quant_sites
from ptq4vit.presets import get_preset

from conftest import make_tiny

FAST = dict(n_candidates=12, progress=False)


@pytest.mark.parametrize("preset", ["base", "official", "ptq4vit", "fast8", "deploy8"])
def test_every_family_quantizes_close_to_float_at_w8a8(tiny_model, preset):
    model, images = tiny_model
    q = ptq4vit.quantize(model, images, preset, 8, 8, **FAST)
    with torch.no_grad():
        ref, out = model(images), q(images)
        with q.quantization_disabled():
            disabled = q(images)
    if not q.preset.bias_correction:  # bias correction moves the biases: disabled is no longer float (docs/deployment.md)
        assert torch.equal(disabled, ref) or torch.allclose(disabled, ref, atol=1e-4)
    assert torch.isfinite(out).all()
    rel = (out - ref).norm() / ref.norm()
    # benchmarks/tolerance_figures.py printed 0.025-0.048 over these nine cases (2026-11-30): about 2x margin
    assert rel < 0.1, f"relative logit error {rel:.3f}"
    assert not torch.equal(out, ref)  # quantization is really on


def test_calibration_is_bit_reproducible():
    model, images = make_tiny("vit")
    a = ptq4vit.quantize(model, images, "ptq4vit", 6, 6, **FAST)
    b = ptq4vit.quantize(model, images, "ptq4vit", 6, 6, **FAST)
    assert a.qparams() == b.qparams()
    with torch.no_grad():
        assert torch.equal(a(images), b(images))


def test_capture_in_several_groups_gives_the_same_scales(monkeypatch):
    model, images = make_tiny("vit")
    one = ptq4vit.quantize(model, images, "ptq4vit", 8, 8, memory_budget=1 << 30, **FAST)
    passes = []

    def counted_capture(*args, **kwargs):
        passes.append(len(args[2]))
        return capture(*args, **kwargs)

    monkeypatch.setattr(run_module, "capture", counted_capture)
    many = ptq4vit.quantize(model, images, "ptq4vit", 8, 8, memory_budget=1 << 22, **FAST)
    assert len(passes) > 1 and sum(passes) == len(many.sites())
    assert one.qparams() == many.qparams()


def test_qparams_follow_the_spec_layout(tmp_path):
    model, images = make_tiny("deit_distilled")
    q = ptq4vit.quantize(model, images, "ptq4vit", 8, 6, **FAST)
    path = tmp_path / "qparams.json"
    ptq4vit.write_qparams_json(q, path)
    doc = json.loads(path.read_text())
    assert doc["preset"] == "ptq4vit" and doc["w_bits"] == 8 and doc["a_bits"] == 6
    assert doc["model"].startswith("deit_tiny_distilled_patch16_224")
    mods = doc["modules"]
    heads = model.blocks[0].attn.num_heads
    assert mods["blocks.0.attn.qkv"]["kind"] == "linear" and len(mods["blocks.0.attn.qkv"]["w_scale"]) == 3
    assert len(mods["blocks.0.attn.qkv"]["a_scale"]) == 1
    fc2 = mods["blocks.0.mlp.fc2"]
    assert set(fc2) == {"kind", "w_scale", "a_scale", "a_neg_scale"}
    assert fc2["a_neg_scale"] == pytest.approx(0.16997124254703522 / 32)
    ratio = fc2["a_scale"][0] / fc2["a_neg_scale"]
    assert ratio == 2.0 ** round(torch.log2(torch.tensor(ratio)).item())  # power-of-two twin in the ptq4vit preset
    m1, m2 = mods["blocks.0.attn.matmul1"], mods["blocks.0.attn.matmul2"]
    assert m1["kind"] == "matmul" and len(m1["a_scale"]) == heads and len(m1["b_scale"]) == heads
    assert "a_scale" not in m2 and len(m2["b_scale"]) == heads
    assert m2["split"] in [2.0 ** -i for i in range(20)]
    assert mods["patch_embed.proj"]["kind"] == "conv"
    assert len(mods["patch_embed.proj"]["w_scale"]) == model.patch_embed.proj.out_channels
    assert "head_dist" in mods
    assert all(v > 0 for m in mods.values() for k, s in m.items() if k.endswith("scale") for v in (s if isinstance(s, list) else [s]))


def test_overrides_reach_the_sites():
    model, images = make_tiny("vit")
    q = ptq4vit.quantize(model, images, "official", 8, 8, softmax_twin=False, gelu_twin=False, metric="cosine", **FAST)
    assert q.preset.overrides() == {"metric": "cosine", "softmax_twin": False, "gelu_twin": False, "n_candidates": 12}
    mods = q.qparams()["modules"]
    assert "a_scale" in mods["blocks.0.attn.matmul2"] and "a_neg_scale" not in mods["blocks.0.mlp.fc2"]


def test_official_gradients_are_rounding_noise_and_ptq4vit_gradients_are_not():
    model, images = make_tiny("vit")
    sites = insert_quant_sites(model, get_preset("ptq4vit"), 8, 8)
    for m in model.modules():
        if hasattr(m, "enabled"):
            m.enabled = False
    name = "blocks.1.mlp.fc1"
    kl = capture(model, images, {name: sites[name]}, "kl-official", batch_size=8)[name].grad
    ce = capture(model, images, {name: sites[name]}, "ce-fp-label", batch_size=8)[name].grad
    assert kl.shape == ce.shape == (6, 17, model.blocks[1].mlp.fc1.out_features)
    assert kl.abs().max() < 1e-5 * ce.abs().max()
    assert ce.abs().max() > 0


@pytest.mark.parametrize("bad, message", [
    (dict(calib_images=torch.randn(2, 32, 32)), r"shape \(N, 3, H, W\)"),
    (dict(preset="fancy"), "unknown preset 'fancy'"),
    (dict(alpha_typo=1), "unknown preset field"),
    (dict(w_bits=1), "w_bits must be an integer from 2 to 8"),
])
def test_bad_arguments_are_explained(bad, message):
    model, images = make_tiny("vit")
    kwargs = dict(calib_images=images, progress=False)
    kwargs.update(bad)
    with pytest.raises(ValueError, match=message):
        ptq4vit.quantize(model, **kwargs)


def test_search_rows_subsets_the_scored_rows_only():
    """``search_rows`` at least the captured rows is the full search, bit for bit; fewer rows score
    on a subset but keep every row's range (the grids' starting points)."""
    model, images = make_tiny("vit")
    full = ptq4vit.quantize(model, images, "ptq4vit", 8, 8, metric="cosine", **FAST)
    same = ptq4vit.quantize(model, images, "ptq4vit", 8, 8, metric="cosine", search_rows=10 ** 6, **FAST)
    scales = lambda q: q.qparams()["modules"]  # noqa: E731
    assert scales(full) == scales(same)
    few = ptq4vit.quantize(model, images, "ptq4vit", 8, 8, metric="cosine", search_rows=8, **FAST)
    assert scales(few) != scales(full)
    with torch.no_grad():
        assert torch.isfinite(few(images)).all()
    with pytest.raises(ptq4vit.errors.UserError, match="search_rows"):
        get_preset("fast8", search_rows=-1)


@pytest.mark.parametrize("grad_source", [None, "ce-fp-label", "kl-official"])
def test_capture_passes_on_several_workers_capture_the_same_tensors(grad_source, monkeypatch):
    model, images = make_tiny("vit")
    sites = insert_quant_sites(model, get_preset("ptq4vit"), 8, 8)
    for m in model.modules():
        if hasattr(m, "enabled"):
            m.enabled = False
    with intra_op_threads(1):
        serial = capture(model, images, sites, grad_source, batch_size=2, grad_chunk=2)
        meeting = threading.Barrier(3, timeout=10)  # broken unless the three passes run at once
        real_forward = model.forward

        def forward_after_meeting(x):
            if len(x) == 2:  # a capture pass, not kl-official's full-batch target pass
                meeting.wait()
            return real_forward(x)

        monkeypatch.setattr(model, "forward", forward_after_meeting)
        parallel = capture(model, images, sites, grad_source, batch_size=2, grad_chunk=2, workers=3)
    for name in sites:
        assert all(torch.equal(a, b) for a, b in zip(serial[name].inputs, parallel[name].inputs, strict=True)), name
        if grad_source is None:
            assert serial[name].grad is None and parallel[name].grad is None
        else:
            assert torch.equal(serial[name].grad, parallel[name].grad), name

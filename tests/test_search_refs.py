"""More batched searches against literal, loop-by-loop readings of docs/method.md §2-4.

tests/test_search.py does this for the linear layer; here: the per-channel patch-embedding
conv, the power-of-two post-GELU twin, the per-head attention matmul, the ``base-cosine``
preset end to end, and a Swin whose shifted windows carry a real attention mask.
"""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import ptq4vit
from ptq4vit.calib.calibrate import calibrate_conv, calibrate_linear, calibrate_matmul
from ptq4vit.nn import QuantConv2d, QuantLinear, QuantMatMul
from ptq4vit.presets import get_preset
from ptq4vit.recipes import get_recipe
from ptq4vit.quant import (TwinGeluQuantizer, TwinSoftmaxQuantizer, UniformQuantizer, gelu_twin_fake_quant,
                           uniform_fake_quant)

from test_search import spec_linear, spec_score


def factors(preset):
    n, al, be = preset.n_candidates, preset.alpha, preset.beta
    return [al + i * (be - al) / n for i in range(n)]


def first_best(scores):
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def f32(v):
    return torch.tensor(v, dtype=torch.float32)


# ------------------------------------------------------------------ per-channel conv


def spec_conv_per_channel(x, w, bias, grad, metric, preset, bits):
    """Each output channel on its own: its candidates scored over its output positions in each image, summed over images."""
    out = F.conv2d(x, w, bias, stride=w.shape[-1])
    scales = []
    for ch in range(w.shape[0]):
        d0 = w[ch].abs().max() / (2 ** (bits - 1) - 0.5)
        o = out[:, ch].flatten(1)                                         # (images, positions)
        scores = []
        for f in factors(preset):
            o_hat = F.conv2d(x, uniform_fake_quant(w[ch:ch + 1], f32(f) * d0, bits),
                             None if bias is None else bias[ch:ch + 1], stride=w.shape[-1])[:, 0].flatten(1)
            if metric == "cosine":
                s = F.cosine_similarity(o_hat, o, dim=-1)
            elif metric == "mse":
                s = -((o - o_hat) ** 2).mean(-1)
            else:
                s = -((grad[:, ch].flatten(1) * (o - o_hat)) ** 2).mean(-1)
            scores.append(s.double().sum().item())
        scales.append(f32(factors(preset)[first_best(scores)]) * d0)
    return torch.stack(scales)


@pytest.mark.parametrize("metric", ["cosine", "mse", "hessian"])
def test_per_channel_conv_search_matches_the_literal_spec(metric):
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 5, kernel_size=4, stride=4)
    x = torch.randn(3, 3, 12, 12)
    grad = torch.randn(3, 5, 3, 3)
    preset = get_preset("ptq4vit", metric=metric, n_candidates=16)
    want = spec_conv_per_channel(x, conv.weight.detach(), conv.bias.detach(), grad, metric, preset, 4)
    site = QuantConv2d(conv, UniformQuantizer(4, 5, axis=0))
    calibrate_conv(site, x, grad, get_recipe(preset), budget=1 << 20)
    assert torch.allclose(site.w_quant.scale, want, rtol=1e-6, atol=0)
    assert len(set(site.w_quant.scale.tolist())) > 1  # the channels really got scales of their own


# ------------------------------------------------------------------ power-of-two post-GELU twin


def spec_pow2_gelu_linear(x, w, bias, grad, metric, preset, w_bits, a_bits, neg):
    """fc2 with a post-GELU twin input: Δ+ is searched among the values 2^m·Δ- inside the grid's range."""
    grid = factors(preset)
    a0 = x.max() / (2 ** (a_bits - 1) - 0.5)
    lo, hi = grid[0] * a0, grid[-1] * a0
    cands = [neg * 2.0 ** m for m in range(-60, 60) if lo <= neg * 2.0 ** m <= hi]
    assert len(cands) >= 2  # several powers to choose from, else the test would prove little
    a_scale = min(cands, key=lambda c: abs(c - a0))
    w0 = w.abs().max() / (2 ** (w_bits - 1) - 0.5)
    out = F.linear(x, w, bias)
    w_scale = w0
    for _ in range(preset.rounds):
        xq = gelu_twin_fake_quant(x, f32(a_scale), f32(neg), a_bits)
        w_scale = f32(grid[first_best([spec_score(F.linear(xq, uniform_fake_quant(w, f32(f) * w0, w_bits), bias), out,
                                                  grad, metric) for f in grid])]) * w0
        wq = uniform_fake_quant(w, w_scale, w_bits)
        a_scale = cands[first_best([spec_score(F.linear(gelu_twin_fake_quant(x, f32(c), f32(neg), a_bits), wq, bias),
                                               out, grad, metric) for c in cands])]
    return w_scale, f32(a_scale)


@pytest.mark.parametrize("metric", ["cosine", "hessian"])
def test_pow2_gelu_search_matches_the_literal_spec(metric):
    torch.manual_seed(4)
    x = F.gelu(torch.randn(3, 9, 16) * 2)
    lin = nn.Linear(16, 6)
    grad = torch.randn(3, 9, 6)
    preset = get_preset("ptq4vit", metric=metric, n_candidates=20, rounds=2)
    quant = TwinGeluQuantizer(6, pow2=True)
    want_w, want_a = spec_pow2_gelu_linear(x, lin.weight.detach(), lin.bias.detach(), grad, metric, preset, 6, 6,
                                           float(quant.neg_scale))
    site = QuantLinear(lin, UniformQuantizer(6), quant)
    calibrate_linear(site, x, grad, get_recipe(preset), budget=1 << 20)
    assert torch.allclose(site.w_quant.scale, want_w.reshape(1), rtol=1e-6, atol=0)
    assert torch.equal(site.a_quant.scale, want_a.reshape(1))


# ------------------------------------------------------------------ per-head attention matmul


def spec_per_head_matmul(a, b, grad, metric, preset, bits):
    """``a @ b`` with one scale per head for each operand; each head scored on its own outputs."""
    heads = a.shape[1]
    grid = factors(preset)
    out = a @ b
    a0 = [a[:, h].abs().max() / (2 ** (bits - 1) - 0.5) for h in range(heads)]
    b0 = [b[:, h].abs().max() / (2 ** (bits - 1) - 0.5) for h in range(heads)]
    a_scale, b_scale = list(a0), list(b0)
    for _ in range(preset.rounds):
        for h in range(heads):
            bq = uniform_fake_quant(b[:, h], b_scale[h], bits)
            g = grad[:, h] if grad is not None else None
            a_scale[h] = f32(grid[first_best([spec_score(uniform_fake_quant(a[:, h], f32(f) * a0[h], bits) @ bq,
                                                         out[:, h], g, metric) for f in grid])]) * a0[h]
        for h in range(heads):
            aq = uniform_fake_quant(a[:, h], a_scale[h], bits)
            g = grad[:, h] if grad is not None else None
            b_scale[h] = f32(grid[first_best([spec_score(aq @ uniform_fake_quant(b[:, h], f32(f) * b0[h], bits),
                                                         out[:, h], g, metric) for f in grid])]) * b0[h]
    return torch.stack(a_scale), torch.stack(b_scale)


@pytest.mark.parametrize("metric", ["cosine", "mse", "hessian"])
def test_per_head_matmul_search_matches_the_literal_spec(metric):
    torch.manual_seed(5)
    q = torch.randn(3, 4, 10, 8) * torch.tensor([0.5, 1.0, 2.0, 4.0]).reshape(1, 4, 1, 1)  # heads of different ranges
    kt = torch.randn(3, 4, 8, 10)
    grad = torch.randn(3, 4, 10, 10)
    preset = get_preset("ptq4vit", metric=metric, n_candidates=16, rounds=3)
    want_a, want_b = spec_per_head_matmul(q, kt, grad, metric, preset, 4)
    site = QuantMatMul(UniformQuantizer(4, 4, axis=1), UniformQuantizer(4, 4, axis=1))
    calibrate_matmul(site, q, kt, grad, get_recipe(preset), budget=1 << 20)
    assert torch.allclose(site.a_quant.scale, want_a, rtol=1e-6, atol=0)
    assert torch.allclose(site.b_quant.scale, want_b, rtol=1e-6, atol=0)


# ------------------------------------------------------------------ whole models


def capture_float_inputs(qmodel, images):
    """Every site's float inputs, recorded with quantization off (what calibration searches on)."""
    seen = {}

    def keep(name):
        def hook(mod, inp, out):
            seen[name] = [t.detach() for t in inp]
        return hook
    hooks = [m.register_forward_hook(keep(n)) for n, m in qmodel.sites().items()]
    with torch.no_grad(), qmodel.quantization_disabled():
        qmodel(images)
    for h in hooks:
        h.remove()
    return seen


def test_base_cosine_preset_matches_the_literal_spec():
    """base-cosine: no twins anywhere, per-channel patch embedding, cosine scores, PTQ4ViT's grid and rounds."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                              embed_dim=32, num_heads=2, num_classes=10).eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    q = ptq4vit.quantize(model, images, "base-cosine", 6, 6, progress=False, n_candidates=10)
    preset = q.preset
    assert (preset.metric, preset.alpha, preset.beta, preset.rounds) == ("cosine", 0.01, 1.2, 3)
    assert not any(isinstance(m, (TwinGeluQuantizer, TwinSoftmaxQuantizer)) for m in q.quantizers())
    seen = capture_float_inputs(q, images)
    for name, site in q.sites().items():
        if isinstance(site, QuantLinear):
            w = site.weight.detach()
            x = seen[name][0]
            unused_grad = torch.zeros(*x.shape[:-1], w.shape[0])  # the cosine metric reads no gradient
            want_w, want_a = spec_linear(x, w, site.bias.detach(), unused_grad, "cosine", site.w_quant.groups,
                                         preset, 6, 6)
            assert torch.allclose(site.w_quant.scale, want_w.reshape(-1), rtol=1e-6, atol=0), name
            assert torch.allclose(site.a_quant.scale, want_a.reshape(1), rtol=1e-6, atol=0), name
        elif isinstance(site, QuantMatMul):
            want_a, want_b = spec_per_head_matmul(*seen[name], None, "cosine", preset, 6)
            assert torch.allclose(site.a_quant.scale, want_a, rtol=1e-6, atol=0), name
            assert torch.allclose(site.b_quant.scale, want_b, rtol=1e-6, atol=0), name
        else:
            x = seen[name][0]
            want = spec_conv_per_channel(x, site.weight.detach(), site.bias.detach(), None, "cosine", preset, 6)
            assert torch.allclose(site.w_quant.scale, want, rtol=1e-6, atol=0)


def test_shifted_window_swin_calibrates_on_the_masked_attention():
    """A Swin whose windows (4x4) are smaller than its token grid (8x8): the second block shifts them and
    masks attention across the wrap-around. The softmax operand it calibrates on is timm's masked softmax."""
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=4,
                              embed_dim=16, depths=(2,), num_heads=(2,), num_classes=10).eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    block = model.layers[0].blocks[1]
    assert block.shift_size == (2, 2) or block.shift_size == 2

    # timm's own masked attention probabilities and v of the shifted block, from the float model
    got = {}

    def keep(mod, args, kwargs):
        got["x"], got["mask"] = args[0], kwargs.get("mask", args[1] if len(args) > 1 else None)
    handle = block.attn.register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        model(images)
    handle.remove()
    mask = got["mask"]
    assert mask is not None and (mask < 0).any()  # the shift mask exists and masks something
    attn = block.attn
    with torch.no_grad():
        B_, N, C = got["x"].shape
        qkv = attn.qkv(got["x"]).reshape(B_, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        qh, kh, v = qkv.unbind(0)
        logits = (qh * attn.scale) @ kh.transpose(-2, -1) + attn._get_rel_pos_bias()
        nw = mask.shape[0]
        logits = (logits.view(-1, nw, attn.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)).view(-1, attn.num_heads, N, N)
        probs = logits.softmax(-1)

    q = ptq4vit.quantize(model, images, "ptq4vit", 6, 6, progress=False, metric="mse", softmax_twin=False,
                         n_candidates=12, rounds=2)
    seen = capture_float_inputs(q, images)
    name = "layers.0.blocks.1.attn.matmul2"
    torch.testing.assert_close(seen[name][0], probs, rtol=1e-5, atol=1e-6)  # the masked softmax, as timm computes it
    want_a, want_b = spec_per_head_matmul(probs, v, None, "mse", q.preset, 6)
    site = q.sites()[name]
    assert torch.allclose(site.a_quant.scale, want_a, rtol=1e-5, atol=0)
    assert torch.allclose(site.b_quant.scale, want_b, rtol=1e-5, atol=0)
    with torch.no_grad():
        ref = model(images)
        with q.quantization_disabled():
            torch.testing.assert_close(q(images), ref, rtol=1e-5, atol=1e-5)

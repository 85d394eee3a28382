"""The batched search against a literal, loop-by-loop reading of SPEC §2."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ptq4vit.calib.calibrate import calibrate_linear, calibrate_matmul
from ptq4vit.calib.search import Product, score
from ptq4vit.nn import QuantLinear, QuantMatMul
from ptq4vit.presets import get_preset
from ptq4vit.quant import TwinSoftmaxQuantizer, UniformQuantizer, softmax_twin_fake_quant, uniform_fake_quant


def spec_score(out_hat, out, grad, metric):
    """Metric over the feature dim, mean over tokens, sum over images: out is (images, tokens, features)."""
    if metric == "cosine":
        per_token = F.cosine_similarity(out_hat, out, dim=-1)
    elif metric == "mse":
        per_token = -((out - out_hat) ** 2).mean(-1)
    else:
        per_token = -((grad * (out - out_hat)) ** 2).mean(-1)
    return per_token.double().mean(-1).sum().item()


def spec_linear(x, w, bias, grad, metric, groups, preset, w_bits, a_bits):
    """SPEC §2 for a linear layer with `groups` output blocks and a per-tensor input, written as plain loops."""
    n, al, be = preset.n_candidates, preset.alpha, preset.beta
    factors = [al + i * (be - al) / n for i in range(n)]
    out = F.linear(x, w, bias)
    size = w.shape[0] // groups
    w0 = [w[g * size:(g + 1) * size].abs().max() / (2 ** (w_bits - 1) - 0.5) for g in range(groups)]
    a0 = x.abs().max() / (2 ** (a_bits - 1) - 0.5)
    w_scale, a_scale = list(w0), a0

    def qw(scales):
        return torch.cat([uniform_fake_quant(w[g * size:(g + 1) * size], scales[g], w_bits) for g in range(groups)])

    for _ in range(preset.rounds):
        xq = uniform_fake_quant(x, a_scale, a_bits)
        new = []
        for g in range(groups):
            cols = slice(g * size, (g + 1) * size)
            scores = []
            for f in factors:
                cand = list(w_scale)
                cand[g] = torch.tensor(f, dtype=torch.float32) * w0[g]
                o = F.linear(xq, qw(cand), bias)
                scores.append(spec_score(o[..., cols], out[..., cols], grad[..., cols], metric))
            new.append(torch.tensor(factors[max(range(n), key=lambda i: (scores[i], -i))], dtype=torch.float32) * w0[g])
        w_scale = new
        wq = qw(w_scale)
        scores = [spec_score(F.linear(uniform_fake_quant(x, torch.tensor(f, dtype=torch.float32) * a0, a_bits), wq, bias), out,
                             grad, metric) for f in factors]
        a_scale = torch.tensor(factors[max(range(n), key=lambda i: (scores[i], -i))], dtype=torch.float32) * a0
    return torch.stack(w_scale), a_scale


@pytest.mark.parametrize("metric", ["cosine", "mse", "hessian"])
@pytest.mark.parametrize("groups", [1, 3])
def test_linear_search_matches_the_literal_spec(metric, groups):
    torch.manual_seed(1)
    x = torch.randn(3, 7, 8)
    lin = nn.Linear(8, 6)
    grad = torch.randn(3, 7, 6)
    preset = get_preset("ptq4vit", metric=metric, n_candidates=25, rounds=2)
    want_w, want_a = spec_linear(x, lin.weight.detach(), lin.bias.detach(), grad, metric, groups, preset, 4, 4)
    site = QuantLinear(lin, UniformQuantizer(4, groups, axis=0 if groups > 1 else None), UniformQuantizer(4))
    calibrate_linear(site, x, grad, preset, budget=1 << 20)
    assert torch.allclose(site.w_quant.scale, want_w, rtol=1e-6, atol=0)
    assert torch.allclose(site.a_quant.scale, want_a.reshape(1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("metric", ["cosine", "hessian"])
def test_chunking_does_not_change_scores(metric):
    torch.manual_seed(0)
    a = torch.randn(6, 16, 8)            # 2 images x 3 heads
    b = torch.randn(6, 8, 12)
    p = Product(a=a, b=b, grad=torch.randn(6, 16, 12), metric=metric, heads=3)
    q = lambda t, s: uniform_fake_quant(t, s, 4)
    cands = torch.rand(10, 3) * 0.5 + 0.01
    for side, fixed in (("a", b), ("b", a)):
        big = score(p, side, fixed, q, cands, budget_bytes=1 << 30, per_head=True)
        tiny = score(p, side, fixed, q, cands, budget_bytes=4096, per_head=True)
        assert big.shape == (10, 3)
        assert torch.allclose(big, tiny, rtol=1e-5, atol=0)
        assert torch.equal(big.argmax(0), tiny.argmax(0))
    lin = Product(a=torch.randn(1, 50, 8), b=torch.randn(1, 8, 12), bias=torch.randn(12), grad=torch.randn(1, 50, 12),
                  metric=metric)
    wc = torch.rand(10, 12) * 0.5 + 0.01
    big = score(lin, "b", lin.a, q, wc, 1 << 30, feature_groups=3)
    tiny = score(lin, "b", lin.a, q, wc, 2048, feature_groups=3)
    assert big.shape == (10, 3) and torch.allclose(big, tiny, rtol=1e-5, atol=0)


def test_per_head_scores_score_each_head_on_its_own_output():
    torch.manual_seed(0)
    a, b = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 4, 6)
    p = Product(a=a.flatten(0, 1), b=b.flatten(0, 1), metric="mse", heads=2)
    cands = torch.tensor([[0.1, 0.1], [0.3, 0.3]])
    scores = score(p, "a", p.b, lambda t, s: uniform_fake_quant(t, s, 4), cands, 1 << 20, per_head=True)
    for h in range(2):
        for i in range(2):
            o_hat = uniform_fake_quant(a[:, h], cands[i, h], 4) @ b[:, h]
            want = spec_score(o_hat, a[:, h] @ b[:, h], None, "mse")
            assert scores[i, h].item() == pytest.approx(want * 5, rel=1e-5)  # sum over rows = 5 x mean


def test_conv_channels_are_scored_over_their_positions():
    torch.manual_seed(0)
    patches, w = torch.randn(3, 4, 5), torch.randn(2, 5)   # 3 images x 4 positions, 2 channels
    p = Product(a=patches.reshape(1, 12, 5), b=w.t().unsqueeze(0), metric="cosine")
    cands = torch.tensor([[0.05, 0.05], [0.4, 0.4]])
    scores = score(p, "b", p.a, lambda t, s: uniform_fake_quant(t, s, 3), cands, 1 << 20, rows_per_item=4)
    for ch in range(2):
        for i in range(2):
            o = patches @ w[ch]
            o_hat = patches @ uniform_fake_quant(w[ch], cands[i, ch], 3)
            want = F.cosine_similarity(o_hat, o, dim=-1).double().sum().item()
            assert scores[i, ch].item() == pytest.approx(want, rel=1e-5)


def test_official_split_search_ignores_v_quantization_and_ptq4vit_does_not():
    torch.manual_seed(0)
    attn = torch.softmax(torch.randn(4, 2, 9, 9) * 3, -1)
    v = torch.randn(4, 2, 9, 8)
    grad = torch.randn(4, 2, 9, 8)
    for preset_name, form in (("official", "sum"), ("ptq4vit", "select")):
        preset = get_preset(preset_name, n_candidates=20)
        site = QuantMatMul(TwinSoftmaxQuantizer(4, form), UniformQuantizer(4, 2, axis=1))
        calibrate_matmul(site, attn, v, grad, preset, 1 << 22)
        split = site.a_quant.split
        # the chosen split is the best of the 20 candidates under the preset's rule
        b_fixed = v if preset_name == "official" else uniform_fake_quant(
            v, (v.transpose(0, 1).reshape(2, -1).abs().amax(1) / 7.5).reshape(1, 2, 1, 1), 4)
        out = attn @ v
        best = max((spec_score((softmax_twin_fake_quant(attn, torch.tensor(2.0 ** -i), 4, form) @ b_fixed).flatten(0, 1),
                               out.flatten(0, 1), grad.flatten(0, 1), "hessian"), -i) for i in range(20))
        assert split.item() == 2.0 ** best[1]

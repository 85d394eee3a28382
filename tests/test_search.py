"""The batched search against a literal, loop-by-loop reading of docs/method.md §2."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ptq4vit.calib.calibrate import calibrate_linear, calibrate_matmul
from ptq4vit.calib.search import Product, best_pruned, score
from ptq4vit.nn import QuantLinear, QuantMatMul
from ptq4vit.presets import get_preset
from ptq4vit.recipes import get_recipe
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
    """docs/method.md §2 for a linear layer with `groups` output blocks and a per-tensor input, written as plain loops."""
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
    preset = get_preset("ptq4vit", metric=metric, n_candidates=12, rounds=2)
    want_w, want_a = spec_linear(x, lin.weight.detach(), lin.bias.detach(), grad, metric, groups, preset, 4, 4)
    site = QuantLinear(lin, UniformQuantizer(4, groups, axis=0 if groups > 1 else None), UniformQuantizer(4))
    calibrate_linear(site, x, grad, get_recipe(preset), budget=1 << 20)
    assert torch.allclose(site.w_quant.scale, want_w, rtol=1e-6, atol=0)
    assert torch.allclose(site.a_quant.scale, want_a.reshape(1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("metric", ["cosine", "hessian"])
def test_chunking_does_not_change_scores(metric):
    torch.manual_seed(0)
    q = lambda t, s: uniform_fake_quant(t, s, 4)
    cands = torch.rand(10, 1) * 0.5 + 0.01
    att = Product(a=torch.randn(6, 16, 8), b=torch.randn(6, 8, 12), grad=torch.randn(6, 16, 12), metric=metric)
    lin = Product(a=torch.randn(1, 50, 8), b=torch.randn(1, 8, 12), bias=torch.randn(12), grad=torch.randn(1, 50, 12),
                  metric=metric)
    for p in (att, lin):
        for side, fixed in (("a", p.b), ("b", p.a)):
            big = score(p, side, fixed, q, cands, budget_bytes=1 << 30)
            tiny = score(p, side, fixed, q, cands, budget_bytes=2048)
            assert big.shape == (10, 1)
            assert torch.allclose(big, tiny, rtol=1e-5, atol=0)
            assert torch.equal(big.argmax(0), tiny.argmax(0))


def test_batched_scores_sum_images_of_the_literal_metric():
    torch.manual_seed(0)
    a, b = torch.randn(3, 5, 4), torch.randn(3, 4, 6)
    p = Product(a=a, b=b, metric="mse")
    cands = torch.tensor([[0.1], [0.3]])
    scores = score(p, "a", p.b, lambda t, s: uniform_fake_quant(t, s, 4), cands, 1 << 20)
    for i in range(2):
        want = spec_score(uniform_fake_quant(a, cands[i, 0], 4) @ b, a @ b, None, "mse")
        assert scores[i, 0].item() == pytest.approx(want * 5, rel=1e-5)  # sum over rows = 5 x mean


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
        calibrate_matmul(site, attn, v, grad, get_recipe(preset), 1 << 22)
        split = site.a_quant.split
        # the chosen split is the best of the 20 candidates under the preset's rule
        b_fixed = v if preset_name == "official" else uniform_fake_quant(
            v, (v.transpose(0, 1).reshape(2, -1).abs().amax(1) / 7.5).reshape(1, 2, 1, 1), 4)
        out = attn @ v
        best = max((spec_score((softmax_twin_fake_quant(attn, torch.tensor(2.0 ** -i), 4, form) @ b_fixed).flatten(0, 1),
                               out.flatten(0, 1), grad.flatten(0, 1), "hessian"), -i) for i in range(20))
        assert split.item() == 2.0 ** best[1]


@pytest.mark.parametrize("metric", ["mse", "hessian"])
@pytest.mark.parametrize("side", ["a", "b"])
def test_pruned_search_picks_the_exhaustive_argmax(metric, side):
    torch.manual_seed(3)
    q = lambda t, s: uniform_fake_quant(t, s, 4)
    lin = Product(a=torch.randn(1, 300, 16), b=torch.randn(1, 16, 24) * 0.2, bias=torch.randn(24),
                  grad=torch.randn(1, 300, 24), metric=metric)
    fixed = lin.b if side == "a" else lin.a
    absmax = (lin.a if side == "a" else lin.b).abs().max()
    cands = (torch.linspace(0.01, 1.2, 60) * absmax / 7.5)[:, None]
    for budget in (1 << 14, 1 << 16, 1 << 30):   # many blocks ... one block
        want = int(score(lin, side, fixed, q, cands, budget).argmax(0)[0])
        assert best_pruned(lin, side, fixed, q, cands, budget) == want
    att = Product(a=torch.randn(8, 10, 6), b=torch.randn(8, 6, 10), grad=torch.randn(8, 10, 10), metric=metric)
    fixed = att.b if side == "a" else att.a
    cands = torch.linspace(0.02, 1.0, 30)[:, None]
    for budget in (1 << 10, 1 << 30):
        assert best_pruned(att, side, fixed, q, cands, budget) == int(score(att, side, fixed, q, cands, budget).argmax(0)[0])


def test_pruning_keeps_the_first_of_tied_candidates():
    q = lambda t, s: uniform_fake_quant(t, s, 8)
    p = Product(a=torch.ones(1, 40, 4), b=torch.ones(1, 4, 3), metric="mse")
    cands = torch.tensor([[10.0], [1.0], [1.0], [0.5], [1.0]])  # 1.0 and 0.5 are both exact
    assert best_pruned(p, "a", p.b, q, cands, 1 << 9) == 1


def test_split_search_with_renormalized_rows_scores_what_the_layer_computes():
    """softmax_renorm: the split is scored on renormalized rows (a plain loop), which here picks
    another split than scoring the plain twin would."""
    torch.manual_seed(0)
    attn = torch.softmax(torch.randn(4, 2, 16, 16) * 3, -1)
    v = torch.randn(4, 2, 16, 8) + 1.0   # a mean in v: mass lost from a row shifts its output
    grad = torch.randn(4, 2, 16, 8)
    preset = get_preset("ptq4vit", n_candidates=20, rounds=1)
    picked = {}
    for renorm in (False, True):
        site = QuantMatMul(TwinSoftmaxQuantizer(4), UniformQuantizer(4, 2, axis=1), renorm_rows=renorm)
        calibrate_matmul(site, attn, v, grad, get_recipe(preset), 1 << 22)
        picked[renorm] = site.a_quant.split.item()
    b_fixed = uniform_fake_quant(v, (v.transpose(0, 1).reshape(2, -1).abs().amax(1) / 7.5).reshape(1, 2, 1, 1), 4)
    out = attn @ v

    def loop_best(renorm):
        scores = []
        for i in range(20):
            q = softmax_twin_fake_quant(attn, torch.tensor(2.0 ** -i), 4, "select")
            if renorm:
                q = q * (attn.sum(-1, keepdim=True) / q.sum(-1, keepdim=True))
            scores.append((spec_score((q @ b_fixed).flatten(0, 1), out.flatten(0, 1), grad.flatten(0, 1), "hessian"), -i))
        return 2.0 ** max(scores)[1]

    assert picked[True] == loop_best(True)
    assert picked[False] == loop_best(False)
    assert picked[True] != picked[False]


@pytest.mark.parametrize("renorm", [False, True])
def test_a_softmax_top_is_searched_at_the_split_then_the_split_at_the_top(renorm):
    """softmax.top: the split at top 1, the top at that split, the split again at that top, each the
    best of its candidates in a plain loop; at 4 bits a top below 1 wins on these rows."""
    torch.manual_seed(0)
    attn = torch.softmax(torch.randn(4, 2, 16, 16) * 1.5, -1)  # no probability near 1
    v = torch.randn(4, 2, 16, 8) + 1.0
    grad = torch.randn(4, 2, 16, 8)
    site = QuantMatMul(TwinSoftmaxQuantizer(4, top=True), UniformQuantizer(4, 2, axis=1), renorm_rows=renorm)
    calibrate_matmul(site, attn, v, grad, get_recipe(get_preset("ptq4vit", n_candidates=20, rounds=1)), 1 << 22)
    b_fixed = uniform_fake_quant(v, (v.transpose(0, 1).reshape(2, -1).abs().amax(1) / 7.5).reshape(1, 2, 1, 1), 4)
    out = attn @ v

    def loop_score(split, top):
        q = softmax_twin_fake_quant(attn, split, 4, "select", top)
        if renorm:
            q = q * (attn.sum(-1, keepdim=True) / q.sum(-1, keepdim=True))
        return spec_score((q @ b_fixed).flatten(0, 1), out.flatten(0, 1), grad.flatten(0, 1), "hessian")

    splits = [torch.tensor(2.0 ** -i) for i in range(20)]
    tops = [torch.tensor(2.0 ** (-j / 2)) for j in range(9)]

    def first_best(cands, fn):  # the first of equal scores, as the search
        scores = [fn(c) for c in cands]
        return cands[scores.index(max(scores))]

    split = first_best(splits, lambda s: loop_score(s, torch.tensor(1.0)))
    top = first_best(tops, lambda t: loop_score(split, t))
    split = first_best(splits, lambda s: loop_score(s, top))
    assert (site.a_quant.split.item(), site.a_quant.top.item()) == (split.item(), top.item())
    assert top.item() < 1

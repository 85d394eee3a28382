"""Quantizer arithmetic on hand-made tensors, values worked out by hand."""
import pytest
import torch

from ptq4vit.quant import (GELU_NEG_RANGE, TwinGeluQuantizer, TwinSoftmaxQuantizer, UniformQuantizer, candidate_factors,
                           check_bits, gelu_twin_codes, gelu_twin_fake_quant, gelu_twin_neg_step, initial_scale, qmax,
                           softmax_split_candidates, softmax_twin_codes, softmax_twin_fake_quant, uniform_codes,
                           uniform_fake_quant)


def t(*v):
    return torch.tensor(v, dtype=torch.float32)


def test_uniform_2bit_rounds_half_to_even_and_clamps_both_edges():
    x = t(-1.0, -0.26, 0.24, 0.25, 0.26, 2.0, -2.0)
    got = uniform_fake_quant(x, torch.tensor(0.5), 2)  # codes in [-2, 1]
    assert torch.equal(got, t(-1.0, -0.5, 0.0, 0.0, 0.5, 0.5, -1.0))


def test_uniform_4bit_and_6bit_code_ranges():
    x = t(7.4, 7.6, -8.4, -8.6, 100.0, -100.0)
    assert torch.equal(uniform_codes(x, torch.tensor(1.0), 4), t(7, 7, -8, -8, 7, -8))
    assert torch.equal(uniform_codes(x * 4, torch.tensor(1.0), 6), t(30, 30, -32, -32, 31, -32))
    assert torch.equal(uniform_codes(x * 16, torch.tensor(1.0), 8), t(118, 122, -128, -128, 127, -128))


def test_initial_scale_and_candidate_grid():
    assert qmax(8) == 128 and qmax(6) == 32 and qmax(4) == 8
    assert initial_scale(torch.tensor(127.5), 8).item() == 1.0
    f = candidate_factors(0.01, 1.2, 100)
    assert f.shape == (100,)
    assert f[0].item() == pytest.approx(0.01)
    assert f[-1].item() == pytest.approx(0.01 + 99 * 1.19 / 100)
    assert (f < 1.2).all()
    base = candidate_factors(0.5, 1.2, 100)
    assert base[1].item() - base[0].item() == pytest.approx(0.007, rel=1e-5)


def test_per_group_weight_quantizer_uses_one_scale_per_row_block():
    q = UniformQuantizer(8, groups=3, axis=0)
    q.set_scale(t(1.0, 0.5, 0.25))
    w = torch.full((6, 2), 0.3)
    out = q(w)
    assert torch.equal(out[0:2], torch.zeros(2, 2))          # 0.3 / 1 -> 0
    assert torch.equal(out[2:4], torch.full((2, 2), 0.5))     # 0.3 / 0.5 = 0.6 -> 1
    assert torch.equal(out[4:6], torch.full((2, 2), 0.25))    # 0.3 / 0.25 = 1.2 -> 1


def test_per_head_quantizer_scales_dim_one():
    q = UniformQuantizer(4, groups=2, axis=1)
    q.set_scale(t(1.0, 0.1))
    x = torch.full((3, 2, 4, 5), 0.35)
    out = q(x)
    assert torch.equal(out[:, 0], torch.zeros(3, 4, 5))
    assert torch.allclose(out[:, 1], torch.full((3, 4, 5), 0.4))  # 3.5 -> 4 (half to even)


def test_uncalibrated_quantizer_refuses_and_disabled_is_identity():
    q = UniformQuantizer(8)
    with pytest.raises(RuntimeError, match="never calibrated"):
        q(torch.ones(2))
    q.enabled = False
    x = torch.randn(5)
    assert q(x) is x


def test_softmax_twin_select_form_4bit():
    s = torch.tensor(0.25)  # Δ_R1 = 0.25/7, Δ_R2 = 1/7
    x = t(0.0, 0.1, 0.2499, 0.25, 0.5, 1.0)
    got = softmax_twin_fake_quant(x, s, 4, "select")
    # 0.5 is a .5 boundary of the hi branch: float32(1/7) is above 1/7, so 0.5 / Δ_R2 = 3.4999998 -> 3
    # (what QuantizeLinear computes; 0.5 * 7 = 3.5 would round to 4)
    want = t(0.0, 3 * 0.25 / 7, 0.25, 2 / 7, 3 / 7, 1.0)
    assert torch.allclose(got, want, atol=0, rtol=1e-6)


def test_softmax_twin_with_a_top_shrinks_both_ranges_and_clips_above_it():
    s, top = torch.tensor(0.5), torch.tensor(0.5)  # regions meet at 0.25; Δ_R1 = 0.25/7, Δ_R2 = 0.5/7
    x = t(0.0, 0.1, 0.2499, 0.25, 0.3, 0.5, 0.9, 1.0)
    got = softmax_twin_fake_quant(x, s, 4, "select", top)
    # 0.1/Δ_R1 = 2.8 -> 3; 0.2499/Δ_R1 = 6.997 -> 7; 0.25/Δ_R2 = 3.5 (3.4999998 in float32) -> 3;
    # 0.3/Δ_R2 = 4.2 -> 4; 0.5 and above: the largest code, 7
    want = t(0.0, 3 * 0.25 / 7, 0.25, 3 * 0.5 / 7, 4 * 0.5 / 7, 0.5, 0.5, 0.5)
    assert torch.allclose(got, want, atol=0, rtol=1e-6)
    lo, hi = softmax_twin_codes(x, s, 4, top)
    assert lo.tolist() == [0, 3, 7, 0, 0, 0, 0, 0] and hi.tolist() == [0, 0, 0, 3, 4, 7, 7, 7]
    y = torch.rand(1000) ** 4  # a top of 1 is the twin without one, bit for bit
    assert torch.equal(softmax_twin_fake_quant(y, s, 4, "select", torch.tensor(1.0)), softmax_twin_fake_quant(y, s, 4))
    with pytest.raises(ValueError, match="'select' form only"):
        softmax_twin_fake_quant(y, s, 4, "sum", top)


def test_softmax_twin_official_sum_form_offsets_every_value():
    s = torch.tensor(0.25)
    x = t(0.0, 0.1, 0.25, 0.5, 1.0)
    got = softmax_twin_fake_quant(x, s, 4, "sum")
    want = t(2 / 7, 2 / 7 + 3 * 0.25 / 7, 2 / 7 + 0.25, 4 / 7 + 0.25, 1.0 + 0.25)  # the released 0.5 · 7 = 3.5 -> 4
    assert torch.allclose(got, want, atol=0, rtol=1e-6)


def test_softmax_twin_codes_combine_with_a_shift():
    x = torch.rand(1000) ** 4
    for i in (0, 3, 7):
        s = torch.tensor(2.0 ** -i)
        lo, hi = softmax_twin_codes(x, s, 8)
        assert lo.max() <= 127 and hi.max() <= 127 and lo.min() >= 0
        assert ((lo == 0) | (hi == 0)).all()
        step_lo = s / 127
        assert torch.allclose((lo + hi * 2 ** i) * step_lo, softmax_twin_fake_quant(x, s, 8, "select"), atol=1e-7)


def _hi_boundaries(bits):
    """float32 values within 8 ulps of every .5 boundary ``(k + 0.5) / levels`` of the hi branch."""
    levels = qmax(bits) - 1
    b = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    x = b.float()
    out = [x]
    up, down = x.clone(), x.clone()
    for _ in range(8):
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-1.0))
        out += [up, down]
    return torch.cat(out)


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_softmax_twin_hi_branch_rounding_at_half_boundaries(bits):
    """``select`` (ptq4vit): hi codes are ``round(x / Δ_R2)`` with the float32 step, what
    QuantizeLinear computes; ``sum`` (official) keeps the released code's ``round(x·(qmax-1))``.
    The two differ next to .5 boundaries (the set below has such x)."""
    import numpy as np
    levels = qmax(bits) - 1
    x = _hi_boundaries(bits)
    s = torch.tensor(2.0 ** -12)  # every x is in the hi region
    step_hi = np.float32(1.0) / np.float32(levels)
    by_step = np.clip(np.round(x.numpy() / step_hi), 0, levels)   # numpy: float32 divide, round half to even
    by_levels = np.round(x.numpy() * np.float32(levels))
    assert (by_step != by_levels).any()
    lo, hi = softmax_twin_codes(x, s, bits)
    assert not lo.any()
    np.testing.assert_array_equal(hi.numpy(), by_step)
    np.testing.assert_array_equal(softmax_twin_fake_quant(x, s, bits, "select").numpy(), (hi * torch.tensor(step_hi)).numpy())
    lo_code = torch.round(s / (s / levels)) * (s / levels)     # sum form: every x >= s also carries lo's top code
    got = softmax_twin_fake_quant(x, s, bits, "sum")
    np.testing.assert_array_equal(got.numpy(), (torch.from_numpy(by_levels) / levels + lo_code).numpy())


def test_softmax_split_candidates_are_powers_of_two():
    c = softmax_split_candidates()
    assert c.shape == (20,) and c[0] == 1.0 and c[-1] == 2.0 ** -19


def test_gelu_twin_4bit():
    neg = gelu_twin_neg_step(4)
    assert neg == pytest.approx(GELU_NEG_RANGE / 8)
    assert GELU_NEG_RANGE == 0.16997124254703522
    x = t(-0.17, -0.05, 0.0, 0.2, 0.3, 3.4, 10.0)
    got = gelu_twin_fake_quant(x, torch.tensor(0.5), neg, 4)
    want = t(-8 * neg, -2 * neg, 0.0, 0.0, 0.5, 3.5, 3.5)
    assert torch.allclose(got, want, atol=1e-7)
    pos, negc = gelu_twin_codes(x, torch.tensor(0.5), neg, 4)
    assert torch.equal(pos, t(0, 0, 0, 0, 1, 7, 7))
    assert torch.equal(negc, t(-8, -2, 0, 0, 0, 0, 0))


def test_twin_quantizer_modules_match_functions():
    sm = TwinSoftmaxQuantizer(6, "select")
    sm.set_split(torch.tensor(1 / 8))
    x = torch.rand(4, 3, 5, 5)
    assert torch.equal(sm(x), softmax_twin_fake_quant(x, torch.tensor(1 / 8), 6, "select"))
    assert "top" not in dict(sm.named_buffers())  # without a top its tensors are those it always had
    sm = TwinSoftmaxQuantizer(6, "select", top=True)
    sm.set_split(torch.tensor(1 / 8))
    sm.set_top(torch.tensor(0.3))
    assert torch.equal(sm(x), softmax_twin_fake_quant(x, torch.tensor(1 / 8), 6, "select", torch.tensor(0.3)))
    assert sm.qparams("a") == {"split": 0.125, "top": pytest.approx(0.3)} and sm.spec()["top"] is True
    with pytest.raises(ValueError, match="'select' form only"):
        TwinSoftmaxQuantizer(6, "sum", top=True)
    ge = TwinGeluQuantizer(6)
    ge.set_scale(torch.tensor([0.1]))
    y = torch.randn(10, 7)
    assert torch.equal(ge(y), gelu_twin_fake_quant(y, torch.tensor([0.1]), gelu_twin_neg_step(6), 6))


@pytest.mark.parametrize("bad", [1, 9, 0, 2.5, "8", True])
def test_bits_out_of_range_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"w_bits must be an integer from 2 to 8"):
        check_bits(bad, "w_bits")

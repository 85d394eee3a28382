"""GPTQ rounding and the second-order weight scale search against plain-loop references."""
import pytest
import torch

import ptq4vit
from ptq4vit.calib.gptq import compensated_target, gptq_quantize, gptq_round, input_hessian, row_scales, search_group_scales
from ptq4vit.nn import QuantLinear
from ptq4vit.quant import candidate_factors, initial_scale, uniform_fake_quant

from conftest import make_tiny


def _layer(out=5, inp=7, rows=40, seed=0):
    """A small layer whose inputs are correlated (mixed Gaussian), with one dead input channel."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, inp, generator=g, dtype=torch.float64) @ torch.randn(inp, inp, generator=g, dtype=torch.float64)
    x[:, 3] = 0.0
    w = torch.randn(out, inp, generator=g, dtype=torch.float64)
    return w, x


def _reference_gptq(w, h, scale, bits, damp, act_order, unrounded=None):
    """Optimal Brain Quantizer order of operations with explicit inverses, one weight at a time
    (``unrounded``, when given, receives each weight as it was just before it was rounded)."""
    w = w.clone()
    h = h.clone()
    n = h.shape[0]
    for j in range(n):
        if h[j, j] == 0:
            h[j, j] = 1.0
            w[:, j] = 0.0
    order = sorted(range(n), key=lambda j: -float(h[j, j])) if act_order else list(range(n))
    mean_diag = sum(float(h[j, j]) for j in range(n)) / n
    for j in range(n):
        h[j, j] += damp * mean_diag
    q = torch.zeros_like(w)
    remaining = list(order)
    while remaining:
        hinv = torch.linalg.inv(h[remaining][:, remaining])
        j = remaining[0]
        for r in range(w.shape[0]):
            if unrounded is not None:
                unrounded[r, j] = w[r, j]
            qv = float(uniform_fake_quant(w[r, j].reshape(1), scale[r].reshape(1), bits))
            err = (float(w[r, j]) - qv) / float(hinv[0, 0])
            q[r, j] = qv
            for i, k in enumerate(remaining[1:], start=1):
                w[r, k] -= err * float(hinv[0, i])
        remaining.pop(0)
    return q


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block", [1, 3, 128])
def test_gptq_equals_plain_loop_reference(act_order, block):
    w, x = _layer()
    h = input_hessian(x)
    scale = w.abs().amax(1) / 7.5 * 0.7
    ours = gptq_quantize(w, h, scale, 4, damp=0.01, act_order=act_order, block=block)
    ref = _reference_gptq(w, h, scale, 4, 0.01, act_order)
    assert torch.equal(ours, ref)
    assert torch.equal(torch.round(ours / scale.reshape(-1, 1)) * scale.reshape(-1, 1), ours)  # on the grid


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block", [1, 3, 128])
def test_gptq_unrounded_weights_equal_plain_loop_and_round_to_its_weights(act_order, block):
    w, x = _layer()
    h = input_hessian(x)
    scale = w.abs().amax(1) / 7.5 * 0.7
    rounded, unrounded = gptq_round(w, h, scale, 4, damp=0.01, act_order=act_order, block=block)
    ref = torch.zeros_like(w)
    _reference_gptq(w, h, scale, 4, 0.01, act_order, unrounded=ref)
    torch.testing.assert_close(unrounded, ref, rtol=0, atol=2e-15)  # float64: the two orders of updates (6e-16 seen)
    assert torch.equal(rounded, gptq_quantize(w, h, scale, 4, damp=0.01, act_order=act_order, block=block))
    assert torch.equal(uniform_fake_quant(unrounded, scale.reshape(-1, 1), 4), rounded)  # nearest of it: GPTQ's
    first = int(torch.argmax(torch.diagonal(h))) if act_order else 0
    assert torch.equal(unrounded[:, first], w[:, first])  # nothing was rounded before the first column
    assert not torch.equal(unrounded, w)                  # the later ones carry the updates


def test_gptq_lowers_output_error_against_round_to_nearest():
    w, x = _layer(out=16, inp=24, rows=200, seed=1)
    h = input_hessian(x)
    scale = search_group_scales(w, h, 16, 4, candidate_factors(0.5, 1.2, 50))
    rtn = uniform_fake_quant(w, scale.reshape(-1, 1), 4)
    gptq = gptq_quantize(w, h, scale, 4, damp=0.01, act_order=True, block=8)

    def err(q):
        return float(((x @ (q - w).t()) ** 2).sum())

    assert err(gptq) < 0.95 * err(rtn)  # measured ratio 0.87


def test_group_scale_search_equals_plain_loop():
    w, x = _layer(out=6, inp=7, rows=30, seed=2)
    h = input_hessian(x)
    factors = candidate_factors(0.3, 1.2, 12)
    for groups in (1, 3, 6):
        got = search_group_scales(w, h, groups, 3, factors, budget_bytes=4096)
        rows = 6 // groups
        for gi in range(groups):
            block = w[gi * rows:(gi + 1) * rows]
            start = initial_scale(block.abs().max().reshape(1), 3)
            best, best_err = None, None
            for f in factors:
                s = f.double() * start
                d = uniform_fake_quant(block, s, 3) - block
                e = sum(float(h[k, k]) * float(d[r, k]) ** 2 for r in range(rows) for k in range(7))
                if best_err is None or e < best_err:
                    best, best_err = s, e
            assert got[gi] == best.to(got.dtype)
    assert torch.equal(row_scales(torch.tensor([1.0, 2.0]), 4), torch.tensor([1.0, 1.0, 2.0, 2.0]))


def test_gptq_calibration_puts_weights_on_their_grid_and_is_reproducible():
    model, images = make_tiny("vit")
    kw = dict(progress=False, n_candidates=4, rounds=1, metric="mse", weight_rounding="gptq", w_granularity="channel")
    q1 = ptq4vit.quantize(model, images, "ptq4vit", 4, 4, **kw)
    q2 = ptq4vit.quantize(model, images, "ptq4vit", 4, 4, **kw)
    assert q1.qparams() == q2.qparams()
    for name, site in q1.sites().items():
        if isinstance(site, QuantLinear):
            assert site.w_quant.groups == site.out_features
            assert torch.equal(site.w_quant(site.weight), site.weight), name
            assert torch.equal(site.weight, q2.model.get_submodule(name).weight)
    assert torch.equal(q1(images), q2(images))


def _input_quant(scale, bits=3):
    return lambda t: uniform_fake_quant(t, torch.tensor(scale, dtype=t.dtype), bits)


def test_compensated_target_is_the_damped_least_squares_fit():
    w, x = _layer(out=5, inp=7, rows=60, seed=3)
    quant = _input_quant(0.4)
    damp = 0.05
    w_star, hq = compensated_target(w, x, quant, damp, rows_per_step=7)  # 60 rows in 9 uneven steps
    xq = quant(x)
    assert torch.allclose(hq, xq.t() @ xq, rtol=1e-14, atol=0)  # summed in 9 steps, not 1
    # Reference: the same objective as one augmented least-squares problem, solved by QR.
    lam = damp * float(torch.diagonal(xq.t() @ xq).mean())
    a = torch.cat([xq, lam ** 0.5 * torch.eye(7, dtype=x.dtype)])
    b = torch.cat([x @ w.t(), lam ** 0.5 * w.t()])
    ref = torch.linalg.lstsq(a, b).solution.t()
    assert (w_star - ref).abs().max() < 1e-10
    # Dead input channel 3: no data, so the damping keeps W* at W there.
    assert torch.allclose(w_star[:, 3], w[:, 3], rtol=0, atol=1e-12)


def test_compensated_target_of_unquantized_inputs_is_the_weight():
    w, x = _layer(out=4, inp=6, rows=30, seed=4)
    w_star, hq = compensated_target(w, x, lambda t: t, 0.01)
    assert (w_star - w).abs().max() < 1e-12
    assert torch.allclose(hq, input_hessian(x), rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="damp > 0"):
        compensated_target(w, x, lambda t: t, 0.0)


def test_gptq_on_quantized_inputs_lowers_the_layer_output_error():
    w, x = _layer(out=16, inp=24, rows=400, seed=5)
    quant = _input_quant(float(x.abs().max()) / 3.5 * 0.6)
    xq = quant(x)
    h = input_hessian(x)
    scale = search_group_scales(w, h, 16, 4, candidate_factors(0.5, 1.2, 50))
    plain = gptq_quantize(w, h, scale, 4, damp=0.01, act_order=True, block=8)
    w_star, hq = compensated_target(w, x, quant, 0.01)
    aware = gptq_quantize(w_star, hq, scale, 4, damp=0.01, act_order=True, block=8)

    def err(q):  # what the quantized layer computes from quantized inputs, against the float layer
        return float(((xq @ q.t() - x @ w.t()) ** 2).sum())

    assert err(aware) < 0.8 * err(plain)  # measured ratio 0.72 (the fit alone, unrounded: 0.66)


def test_gptq_quantized_inputs_calibration_changes_weights_and_is_reproducible():
    model, images = make_tiny("vit")
    kw = dict(progress=False, n_candidates=4, rounds=1, metric="mse", weight_rounding="gptq", w_granularity="channel")
    plain = ptq4vit.quantize(model, images, "ptq4vit", 4, 4, **kw)
    q1 = ptq4vit.quantize(model, images, "ptq4vit", 4, 4, gptq_quantized_inputs=True, **kw)
    q2 = ptq4vit.quantize(model, images, "ptq4vit", 4, 4, gptq_quantized_inputs=True, **kw)
    assert q1.qparams() == q2.qparams()
    changed = 0
    for name, site in q1.sites().items():
        if isinstance(site, QuantLinear):
            assert torch.equal(site.w_quant(site.weight), site.weight), name
            changed += not torch.equal(site.weight, plain.model.get_submodule(name).weight)
    assert changed == sum(isinstance(s, QuantLinear) for s in q1.sites().values())
    assert torch.equal(q1(images), q2(images))


def test_gptq_preset_errors():
    with pytest.raises(ptq4vit.errors.UserError, match="weight_rounding"):
        ptq4vit.get_preset("ptq4vit", weight_rounding="adaround")
    with pytest.raises(ptq4vit.errors.UserError, match="gptq_block"):
        ptq4vit.get_preset("ptq4vit", gptq_block=0)
    with pytest.raises(ptq4vit.errors.UserError, match="override gptq_quantized_inputs=True would change nothing .*weights.rounding.quantized_inputs does "
                       "not apply"):
        ptq4vit.get_preset("ptq4vit", gptq_quantized_inputs=True)
    with pytest.raises(ptq4vit.errors.UserError, match="gptq.quantized_inputs needs damp > 0"):
        ptq4vit.get_preset("ptq4vit", weight_rounding="gptq", gptq_quantized_inputs=True, gptq_damp=0.0)

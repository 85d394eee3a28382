"""Block reconstruction (docs/lowbit.md §11): the learned rounding's arithmetic, the learned steps' gradient,
what each switch changes, and that a reconstructed model stays an ordinary quantized model."""
import copy
import dataclasses
import json
import math
import re

import pytest
import timm
import torch

import ptq4vit
from ptq4vit import Reconstruction, UserError, reconstruct
from ptq4vit.calib.reconstruct import _fisher_weights, _float_model, _replaced_parameters
from ptq4vit.calib.units import reconstruction_units
from ptq4vit.nn import QuantLinear
from ptq4vit.presets import get_preset
from ptq4vit.quant import AsymmetricQuantizer, TwinGeluQuantizer, UniformQuantizer, qmax
from ptq4vit.quant.learning import (STEP_RULES, LearningActivation, LearningWeight, SignRoundingWeight, WEIGHT_GRIDS,
                                    hard_rounding, rounding_regularizer, soft_rounding, soft_rounding_start)

from _fastq import fast_quantize
from conftest import make_tiny, make_tiny_dinov2

#: The last block learns against its whole output, as every other (the references below compute block outputs).
FAST = Reconstruction(iterations=25, images=8, batch_size=4, last_unit="output")


def tiny_w4a4(preset="ptq4vit"):
    m, _ = make_tiny("vit")
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    return m, x, fast_quantize(m, x, preset, 4, 4)


def run(q, x, options=FAST):
    return reconstruct(q, x, options, progress=False, threads=1)


def block_io(q, x):
    """Per block: (quantized input, float input, float output) over ``x``."""
    seen = {}

    def keep(tag):
        def hook(mod, args, out):
            seen.setdefault(tag, []).append((mod, args[0].detach(), out.detach()))
        return hook
    handles = []
    for name, blk in q.model.blocks.named_children():
        handles.append(blk.register_forward_hook(keep(name)))
    with torch.no_grad():
        q(x)
        quant = {k: v[0][1] for k, v in seen.items()}
        seen.clear()
        with q.quantization_disabled():
            q(x)
    for h in handles:
        h.remove()
    return {k: (quant[k], v[0][1], v[0][2]) for k, v in seen.items()}


def block_error(q, blk_name, x_in, target):
    with torch.no_grad():
        y = getattr(q.model.blocks, blk_name)(x_in)
    return float((y.double() - target.double()).square().sum() / target.double().square().sum())


# ---- the arithmetic

def test_soft_rounding_values_and_the_hard_rounding_it_anneals_to():
    v = torch.tensor([-10.0, -1e-3, 0.0, 10.0])
    assert soft_rounding(v)[[0, 2, 3]].tolist() == [0.0, 0.5, 1.0]       # stretched sigmoid reaches 0 and 1
    assert hard_rounding(v).tolist() == [0.0, 0.0, 1.0, 1.0]             # h >= 0.5 <=> V >= 0
    assert rounding_regularizer(torch.tensor([-10.0, 10.0]), 2.0).item() == 0.0   # hard: no penalty
    assert rounding_regularizer(torch.tensor([0.0]), 20.0).item() == 1.0          # h = 1/2: the largest
    rest = torch.tensor([0.0, 0.25, 0.75])
    torch.testing.assert_close(soft_rounding(soft_rounding_start(rest)), rest, rtol=0, atol=1e-7)


def test_learned_weight_rounds_on_the_calibrated_grid():
    q = UniformQuantizer(3)                                   # codes -4..3
    q.set_scale(torch.tensor([0.5]))
    w = torch.tensor([[0.26, -0.74, 1.5, 3.9]])               # W/Δ = 0.52, -1.48, 3, 7.8
    lw = LearningWeight(q, w, WEIGHT_GRIDS.get(q)(q, w))
    assert lw.base.tolist() == [[0.0, -2.0, 3.0, 7.0]]
    assert lw.hard_codes().tolist() == [[1.0, -1.0, 3.0, 3.0]]   # from the start: round to nearest, clamped
    with torch.no_grad():
        lw.v.fill_(-5.0)
    assert lw.hard_codes().tolist() == [[0.0, -2.0, 3.0, 3.0]]   # every weight down
    with torch.no_grad():
        lw.v.fill_(5.0)
    assert lw.hard_codes().tolist() == [[1.0, -1.0, 3.0, 3.0]]   # every weight up, clamped at qmax - 1
    lw.soft = False
    assert lw(w).tolist() == [[0.5, -0.5, 1.5, 1.5]]


def test_sign_rounding_is_hard_from_the_start_and_moves_by_the_gradients_sign():
    q = UniformQuantizer(3)                                   # codes -4..3
    q.set_scale(torch.tensor([0.5]))
    w = torch.tensor([[0.26, -0.74, 0.5, 3.9]])               # W/Δ = 0.52, -1.48, 1, 7.8
    sw = SignRoundingWeight(q, w, WEIGHT_GRIDS.get(q)(q, w))
    assert sw.hard_codes().tolist() == [[1.0, -1.0, 1.0, 3.0]]   # V = 0: round to nearest, clamped
    out = sw(w)
    assert out.tolist() == [[0.5, -0.5, 0.5, 1.5]]               # the forward is the hard weight itself
    out.sum().backward()
    assert sw.v.grad.tolist() == [[0.5, 0.5, 0.5, 0.0]]           # Δ straight through round; 0 where clamped
    with torch.no_grad():
        sw.v.fill_(-0.5)
    assert sw.hard_codes().tolist() == [[0.0, -2.0, 1.0, 3.0]]   # down; 1 - 1/2 ties to 0 but stays on floor(1)
    with torch.no_grad():
        sw.v.fill_(0.5)
    assert sw.hard_codes().tolist() == [[1.0, -1.0, 2.0, 3.0]]   # up (W/Δ = 1 up to 2), clamped at qmax - 1
    with torch.no_grad():
        sw.v.zero_()
    sw.v.grad = torch.tensor([[1.0, -2.0, 0.0, 3.0]])
    sw.sign_step(0.3)
    assert torch.equal(sw.v.detach(), torch.tensor([[-0.3, 0.3, 0.0, -0.3]]))
    sw.sign_step(0.3)
    assert sw.v.tolist() == [[-0.5, 0.5, 0.0, -0.5]]   # kept within half a step


def test_a_sign_roundings_unrounded_weight_rounds_to_nearest_to_its_learned_codes():
    q = UniformQuantizer(3)                                   # codes -4..3
    q.set_scale(torch.tensor([0.5]))
    w = torch.tensor([[0.26, -0.74, 0.5, 3.9]])               # W/Δ = 0.52, -1.48, 1, 7.8
    sw = SignRoundingWeight(q, w, WEIGHT_GRIDS.get(q)(q, w))
    with torch.no_grad():
        sw.v.copy_(torch.tensor([[-0.3, -0.2, 0.4, 0.1]]))
    assert sw.hard_codes().tolist() == [[0.0, -2.0, 1.0, 3.0]]   # 0.22, -1.68, 1.4 (kept to 1), 7.9 (clamped)
    start = sw.unrounded()
    assert start[0].tolist() == pytest.approx([0.11, -0.84, 0.7, 3.95], abs=1e-6)   # (W/Δ + V) · Δ
    again = SignRoundingWeight(q, start, WEIGHT_GRIDS.get(q)(q, start))
    assert torch.equal(again.hard_codes(), sw.hard_codes())    # V = 0 from there: the same codes


def test_learned_weight_step_gets_the_lsq_gradient_and_the_codes_follow_the_moved_grid():
    q = UniformQuantizer(3, groups=2, axis=0)                 # a step per row, codes -4..3
    q.set_scale(torch.tensor([0.5, 1.0]))
    w = torch.tensor([[0.26, -0.74, 0.5, 3.9],                # W/Δ = 0.52, -1.48, 1, 7.8
                      [0.3, -1.6, 2.2, 9.0]])                 # W/Δ = 0.3, -1.6, 2.2, 9
    sw = SignRoundingWeight(q, w, WEIGHT_GRIDS.get(q)(q, w), learn_step=True)
    fixed = SignRoundingWeight(q, w, WEIGHT_GRIDS.get(q)(q, w))
    out = sw(w)
    assert torch.equal(out, fixed(w)) and torch.equal(sw.hard_codes(), fixed.hard_codes())   # s = 0: as calibrated
    out.sum().backward()
    # d/ds of Δe^s·code(W/(Δe^s)) at s = 0: Δ·(code - W/Δ) where the code is inside the range, Δ·code where clamped
    want = [0.5 * ((1 - 0.52) + (-1 + 1.48) + (1 - 1) + 3), (0 - 0.3) + (-2 + 1.6) + (2 - 2.2) + 3]
    assert sw.s.grad.tolist() == pytest.approx(want, abs=1e-6)
    with torch.no_grad():
        sw.s.copy_(torch.tensor([math.log(2.0), 0.0]))        # row 0's step 0.5 -> 1
    assert sw.learned_scale().tolist() == pytest.approx([1.0, 1.0], rel=1e-6)
    assert sw.hard_codes().tolist() == [[0.0, -1.0, 0.0, 3.0], [0.0, -2.0, 2.0, 3.0]]   # around W/Δ' now
    assert LearningWeight(q, w, WEIGHT_GRIDS.get(q)(q, w)).learned_scale() is None


def test_learned_step_is_the_quantizer_at_the_start_and_gets_the_lsq_gradient():
    x = torch.tensor([[0.3, 5.0, -0.7, 1.2]])
    q = UniformQuantizer(3)
    q.set_scale(torch.tensor([1.0]))
    la = LearningActivation(q, STEP_RULES.get(q), learn=True)
    out = la(x)
    assert torch.equal(out, q(x))
    out.sum().backward()
    # d/dΔ of round(x/Δ)·Δ is round(x/Δ) - x/Δ inside the range, the clamped code outside (Δ = 1: d/du too)
    want = (torch.tensor(0.0) - 0.3) + 3.0 + (torch.tensor(-1.0) + 0.7) + (torch.tensor(1.0) - 1.2)
    assert la.u.grad.item() == pytest.approx(want.item(), abs=1e-6)
    a = AsymmetricQuantizer(4, groups=2, axis=-1)
    a.set_params(torch.tensor([0.1, 0.3]), torch.tensor([-3.0, 2.0]))
    y = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(LearningActivation(a, STEP_RULES.get(a), learn=True)(y), a(y))


# ---- reconstruction

@pytest.mark.parametrize("rounding", ["adaround", "sign"])
def test_reconstruction_lowers_every_block_output_error_and_keeps_weights_on_the_grid(rounding):
    m, x, q = tiny_w4a4()
    calibrated = copy.deepcopy(q)
    before = block_io(calibrated, x)
    report = run(q, x, Reconstruction(iterations=25, images=8, batch_size=4, rounding=rounding))
    assert [u.name for u in report.units] == ["blocks.0", "blocks.1"]
    for name, (xq, _, target) in before.items():      # blocks.1: on the calibrated model's quantized inputs
        assert block_error(q, name, xq, target) < block_error(calibrated, name, xq, target)
    changed = 0
    for (name, site), old in zip(q.sites().items(), calibrated.sites().values()):
        if not isinstance(site, QuantLinear) or not name.startswith("blocks."):
            continue
        wq = site.w_quant
        codes = wq.codes(site.weight.detach())
        assert torch.equal(wq.dequantize(codes.clone(), torch.float32), site.weight.detach())   # on the grid
        assert codes.min() >= -qmax(wq.bits) and codes.max() <= qmax(wq.bits) - 1
        step = wq.scale.repeat_interleave(site.weight.shape[0] // wq.groups).reshape(-1, 1)
        assert torch.equal(wq.scale, old.w_quant.scale)                      # the weight grid is not learned
        low = torch.floor(old.weight.detach() / step).clamp(-qmax(wq.bits), qmax(wq.bits) - 1)
        high = (torch.floor(old.weight.detach() / step) + 1).clamp(-qmax(wq.bits), qmax(wq.bits) - 1)
        assert bool(((codes == low) | (codes == high)).all())               # one of the two neighbours
        changed += int((codes != old.w_quant.codes(old.weight.detach())).sum())
    assert changed > 0


@pytest.mark.parametrize("weight_steps", [False, True])
def test_reconstructed_model_saves_loads_and_exports_like_a_calibrated_one(tmp_path, weight_steps):
    pytest.importorskip("onnxruntime")
    from ptq4vit.export import export_onnx
    m, x, q = tiny_w4a4()
    calibrated = copy.deepcopy(q)
    run(q, x, dataclasses.replace(FAST, learn_weight_steps=weight_steps))
    ptq4vit.save(q, tmp_path / "r.safetensors")
    q2 = ptq4vit.load(tmp_path / "r.safetensors")
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))
    assert q2.qparams() == q.qparams()
    integer = [sum(s.integer for s in export_onnx(model, tmp_path / f"{i}.onnx").sites)
               for i, model in enumerate((calibrated, q))]
    assert integer[0] == integer[1] > 0


def test_rotq_model_with_online_rotation_is_reconstructed():
    m, x = make_tiny_dinov2(depth=2)
    q = ptq4vit.quantize(m, x, "rotq", 4, 4, progress=False, n_candidates=4, rounds=1, threads=1,
                         reconstruction=Reconstruction(iterations=25, images=4, batch_size=2, inputs="float"))
    assert type(q.model.blocks[0].mlp.norm).__name__ == "OnlineRotation"
    report = q.reconstruction_report
    assert [u.name for u in report.units] == ["blocks.0", "blocks.1"]
    assert all(u.error_after < u.error_before for u in report.units)


@pytest.mark.parametrize("rounding", ["adaround", "sign"])
def test_same_seed_gives_the_same_model_and_another_seed_another(rounding):
    m, x, q = tiny_w4a4()
    a, b, c = copy.deepcopy(q), copy.deepcopy(q), copy.deepcopy(q)
    options = Reconstruction(iterations=25, images=8, batch_size=4, rounding=rounding)
    run(a, x, options)
    run(b, x, options)
    run(c, x, dataclasses.replace(options, seed=1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def _weights_and_buffers(q):
    weights = {n: s.weight.detach().clone() for n, s in q.sites().items() if hasattr(s, "weight")}
    buffers = {n: b.clone() for n, b in q.named_buffers() if "quant" in n}
    return weights, buffers


def _biases(q):
    return {n: s.bias.detach().clone() for n, s in q.sites().items() if getattr(s, "bias", None) is not None}


def test_switches_learn_only_what_they_say():
    m, x, q = tiny_w4a4()
    w0, b0 = _weights_and_buffers(q)
    bias0 = _biases(q)

    no_rounding = copy.deepcopy(q)
    run(no_rounding, x, Reconstruction(iterations=25, images=8, batch_size=4, learn_rounding=False))
    w, b = _weights_and_buffers(no_rounding)
    assert all(torch.equal(w[n], w0[n]) for n in w0)
    assert not all(torch.equal(b[n], b0[n]) for n in b0)

    no_steps = copy.deepcopy(q)
    run(no_steps, x, Reconstruction(iterations=25, images=8, batch_size=4, learn_steps=False))
    w, b = _weights_and_buffers(no_steps)
    assert all(torch.equal(b[n], b0[n]) for n in b0)
    assert not all(torch.equal(w[n], w0[n]) for n in w0)

    assert all(torch.equal(bias[n], bias0[n]) for bias in (_biases(no_rounding), _biases(no_steps)) for n in bias0)

    nothing = copy.deepcopy(q)
    report = run(nothing, x, Reconstruction(iterations=5, images=8, batch_size=4, learn_steps=False,
                                            learn_rounding=False))
    assert all(torch.equal(a, b) for a, b in zip(nothing.state_dict().values(), q.state_dict().values()))
    assert all(u.error_after == u.error_before for u in report.units)

    only_bias = copy.deepcopy(q)
    report = run(only_bias, x, Reconstruction(iterations=25, images=8, batch_size=4, learn_steps=False,
                                              learn_rounding=False, learn_bias=True))
    w, b = _weights_and_buffers(only_bias)
    assert all(torch.equal(w[n], w0[n]) for n in w0) and all(torch.equal(b[n], b0[n]) for n in b0)
    bias = _biases(only_bias)
    for u in report.units:  # a kept block's biases all moved; a restored one's are as calibrated
        names = [n for n in bias0 if n.startswith(u.name + ".")]
        assert names and all(torch.equal(bias[n], bias0[n]) != u.kept for n in names), (u, names)
    assert any(u.kept for u in report.units)
    assert [(p.grad, p.requires_grad) for p in only_bias.parameters()] == [(None, p.requires_grad)
                                                                          for p in q.parameters()]

    weight_steps = copy.deepcopy(q)   # the weights' steps move, each weight on one of its two codes of the moved grid
    report = run(weight_steps, x, Reconstruction(iterations=25, images=8, batch_size=4, learn_weight_steps=True))
    assert not report.restored()
    sites = [(n, s, weight_steps.sites()[n]) for n, s in q.sites().items() if isinstance(s, QuantLinear)
             and n.startswith("blocks.")]
    assert sites and all(not torch.equal(new.w_quant.scale, old.w_quant.scale) for _, old, new in sites)
    for _, old, new in sites:
        wq = new.w_quant
        step = wq.scale.repeat_interleave(new.weight.shape[0] // wq.groups).reshape(-1, 1)
        codes = wq.codes(new.weight.detach())
        assert torch.equal(wq.dequantize(codes.clone(), torch.float32), new.weight.detach())   # on the moved grid
        low = torch.floor(old.weight.detach() / step).clamp(-qmax(wq.bits), qmax(wq.bits) - 1)
        assert bool(((codes == low) | (codes == (low + 1).clamp(max=qmax(wq.bits) - 1))).all())

    no_drop = copy.deepcopy(q)
    run(no_drop, x, Reconstruction(iterations=25, images=8, batch_size=4, qdrop=0.0))
    with_drop = copy.deepcopy(q)
    run(with_drop, x, Reconstruction(iterations=25, images=8, batch_size=4, qdrop=0.5))
    assert not all(torch.equal(a, b) for a, b in zip(no_drop.state_dict().values(), with_drop.state_dict().values()))


def test_twin_steps_are_learned_or_held_fixed():
    m, _ = make_tiny("vit")
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    q = fast_quantize(m, x, get_preset("ptq4vit", gelu_pow2=False), 4, 4)
    fc2 = "model.blocks.0.mlp.fc2.a_quant.scale"
    assert isinstance(q.model.blocks[0].mlp.fc2.a_quant, TwinGeluQuantizer)
    learned, fixed = copy.deepcopy(q), copy.deepcopy(q)
    run(learned, x)
    report = run(fixed, x, Reconstruction(iterations=25, images=8, batch_size=4, learn_twin_log=False))
    assert not torch.equal(learned.state_dict()[fc2], q.state_dict()[fc2])
    assert torch.equal(fixed.state_dict()[fc2], q.state_dict()[fc2])
    assert report.held_fixed == {"TwinGeluQuantizer": 2, "TwinSoftmaxQuantizer": 2}


def test_a_softmax_twins_top_is_learned_or_held_fixed_and_its_split_never_moves():
    m, _ = make_tiny("vit")
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    q = fast_quantize(m, x, get_preset("ptq4vit", softmax_twin_top=True), 4, 4)
    sm = q.model.blocks[0].attn.matmul2.a_quant
    assert sm.has_top
    p = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(LearningActivation(sm, STEP_RULES.get(sm), learn=True)(p), sm(p))  # the quantizer at the start
    top, split = "model.blocks.0.attn.matmul2.a_quant.top", "model.blocks.0.attn.matmul2.a_quant.split"
    learned, fixed = copy.deepcopy(q), copy.deepcopy(q)
    report = run(learned, x)
    assert not torch.equal(learned.state_dict()[top], q.state_dict()[top])
    assert torch.equal(learned.state_dict()[split], q.state_dict()[split])
    assert "TwinSoftmaxQuantizer" not in report.held_fixed
    report = run(fixed, x, Reconstruction(iterations=25, images=8, batch_size=4, learn_twin_log=False))
    assert torch.equal(fixed.state_dict()[top], q.state_dict()[top])
    assert report.held_fixed["TwinSoftmaxQuantizer"] == 2


def test_inputs_switch_chooses_the_quantized_or_the_float_block_inputs():
    m, x, q = tiny_w4a4()
    io = block_io(q, x)
    for inputs, which in (("quantized", 0), ("float", 1)):
        # nothing learned: blocks.1's quantized inputs are the calibrated model's
        report = run(copy.deepcopy(q), x, Reconstruction(iterations=1, images=8, batch_size=4, inputs=inputs,
                                                         learn_rounding=False, learn_steps=False, last_unit="output"))
        want = block_error(q, "1", io["1"][which], io["1"][2])
        assert report.units[1].error_before == pytest.approx(want, rel=1e-6)
    assert block_error(q, "1", io["1"][0], io["1"][2]) != pytest.approx(block_error(q, "1", io["1"][1], io["1"][2]),
                                                                         rel=1e-3)


def test_each_block_learns_on_the_outputs_of_the_blocks_before_it_as_kept_or_restored():
    m, x, q = tiny_w4a4()
    calibrated = copy.deepcopy(q)
    io = block_io(calibrated, x)   # the float targets: the calibrated model's weights are the float ones
    report = run(q, x)
    assert not report.restored()
    final = block_io(q, x)   # blocks.1's quantized input: the reconstructed blocks.0's output
    assert report.units[1].error_after == pytest.approx(block_error(q, "1", final["1"][0], io["1"][2]), rel=1e-6)
    restored = run(copy.deepcopy(calibrated), x, dataclasses.replace(FAST, lr_steps=1.0, lr_rounding=10.0, qdrop=0.5))
    assert restored.restored() == ["blocks.0", "blocks.1"]   # blocks.1's input: the calibrated blocks.0's output
    assert restored.units[1].error_before == pytest.approx(block_error(calibrated, "1", io["1"][0], io["1"][2]),
                                                           rel=1e-6)


def test_sublayer_units_compose_to_the_block_and_are_reconstructed():
    m, x, q = tiny_w4a4()
    units = reconstruction_units(q.model, "sublayer")
    assert [u.name for u in units] == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    h = torch.randn(3, 17, 192, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(units[1].forward(units[0].forward(h)), q.model.blocks[0](h))
    report = run(q, x, Reconstruction(iterations=25, images=8, batch_size=4, unit="sublayer"))
    assert [u.name for u in report.units] == [u.name for u in units]
    assert any(u.error_after < u.error_before for u in report.units)


def test_the_vit_adapter_states_the_features_its_classifier_reads_and_refuses_where_none_are_pooled():
    from ptq4vit.models import DEFAULT_ADAPTERS, UnsupportedModelError
    adapters = DEFAULT_ADAPTERS
    h = torch.randn(3, 17, 192, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m, _ = make_tiny("vit")                                  # class token pooled
        read = adapters.adapter_for(m).head_features(m)
        assert torch.equal(read(h), m.norm(h)[:, 0])
        assert torch.equal(m.head(read(h)), m.forward_head(m.norm(h)))   # all the head reads
        avg = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=10,
                                global_pool="avg").eval()
        assert torch.equal(adapters.adapter_for(avg).head_features(avg)(h), avg.fc_norm(h[:, 1:].mean(1)))
        d, _ = make_tiny("deit_distilled")                       # two heads, each reading its own token
        assert torch.equal(adapters.adapter_for(d).head_features(d)(h), d.norm(h)[:, :2])
    for pool, why in (("", "with global_pool='': it outputs every token"),
                      ("map", "with global_pool='map': its attention pool holds quantization sites")):
        other = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=10,
                                  global_pool=pool)
        with pytest.raises(UnsupportedModelError, match=f"last_unit='features' is not supported for a "
                                                        f"VisionTransformer {re.escape(why)}"):
            adapters.adapter_for(other).head_features(other)


def test_with_last_unit_features_the_last_block_learns_against_what_the_classifier_reads():
    m, x, q = tiny_w4a4()
    io = block_io(q, x)
    fixed = dict(iterations=1, images=8, batch_size=4, learn_rounding=False, learn_steps=False, fisher=False)
    whole = run(copy.deepcopy(q), x, Reconstruction(**fixed, last_unit="output"))
    read = run(copy.deepcopy(q), x, Reconstruction(**fixed, last_unit="features"))
    assert (whole.last_unit, read.last_unit) == ("output", "features")
    with torch.no_grad():   # the plain reference: the class token's final norm, quantized block against float
        y = q.model.norm(q.model.blocks[1](io["1"][0]))[:, 0].double()
        t = q.model.norm(io["1"][2])[:, 0].double()
    assert read.units[1].error_before == pytest.approx(float((y - t).square().sum() / t.square().sum()), rel=1e-6)
    assert whole.units[1].error_before == pytest.approx(block_error(q, "1", io["1"][0], io["1"][2]), rel=1e-6)
    assert read.units[1].error_before != pytest.approx(whole.units[1].error_before, rel=1e-2)
    assert read.units[0] == whole.units[0]                      # the blocks before it learn as they did
    learned = copy.deepcopy(q)
    report = run(learned, x, Reconstruction(iterations=25, images=8, batch_size=4, fisher=False,
                                            last_unit="features"))
    assert report.units[1].kept and report.units[1].error_after < report.units[1].error_before
    final = block_io(learned, x)
    with torch.no_grad():
        y = learned.model.norm(learned.model.blocks[1](final["1"][0]))[:, 0].double()
    assert report.units[1].error_after == pytest.approx(float((y - t).square().sum() / t.square().sum()), rel=1e-6)


def test_last_unit_auto_takes_the_features_where_the_family_states_them_and_the_whole_output_elsewhere():
    m, x, q = tiny_w4a4()
    options = dict(iterations=3, images=8, batch_size=4)
    auto, features = copy.deepcopy(q), copy.deepcopy(q)
    report = run(auto, x, Reconstruction(**options))                     # the default
    assert report.last_unit == "features" and "the last against the classifier's features" in report.summary()
    assert report == run(features, x, Reconstruction(**options, last_unit="features"))
    assert all(torch.equal(a, b) for a, b in zip(auto.state_dict().values(), features.state_dict().values()))
    with_fisher = run(copy.deepcopy(q), x, Reconstruction(**options, fisher=True))  # the Fisher weighs the output
    assert with_fisher.last_unit == "output" and "classifier's features" not in with_fisher.summary()
    torch.manual_seed(0)
    unpooled = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10,
                                 global_pool="").eval()      # outputs every token: no features to read
    q = fast_quantize(unpooled, x, "ptq4vit", 4, 4)
    auto, output = copy.deepcopy(q), copy.deepcopy(q)
    report = run(auto, x, Reconstruction(**options))
    assert report.last_unit == "output"
    assert report == run(output, x, Reconstruction(**options, last_unit="output"))
    assert all(torch.equal(a, b) for a, b in zip(auto.state_dict().values(), output.state_dict().values()))


def test_fisher_weights_are_the_squared_gradients_at_the_block_outputs():
    m, x, q = tiny_w4a4()
    units = reconstruction_units(q.model, "block")
    got = _fisher_weights(q, x, units, batch=8, replaced=[])
    outs = []

    def keep(mod, args, out):
        out.retain_grad()
        outs.append(out)
    handle = q.model.blocks[1].register_forward_hook(keep)
    with q.quantization_disabled(), torch.enable_grad():
        xi = x.clone().requires_grad_(True)
        logits = q(xi)
        torch.nn.functional.cross_entropy(logits, logits.detach().argmax(-1), reduction="sum").backward()
    handle.remove()
    assert torch.equal(got[1], outs[0].grad.square().to(torch.bfloat16))
    weighted = copy.deepcopy(q)
    run(weighted, x, Reconstruction(iterations=25, images=8, batch_size=4, fisher=True))
    plain = copy.deepcopy(q)
    run(plain, x, FAST)                  # the plain output error, the last block's whole output as with the Fisher
    assert not all(torch.equal(a, b) for a, b in zip(weighted.state_dict().values(), plain.state_dict().values()))


def test_with_fisher_a_unit_is_kept_or_restored_by_the_weighted_error_it_learns_against():
    m, x, q = tiny_w4a4()
    units = reconstruction_units(q.model, "block")
    w0 = _fisher_weights(q, x, units, batch=8, replaced=[])[0].double()
    x_quant, _, target = block_io(q, x)["0"]
    with torch.no_grad():
        y = q.model.blocks[0](x_quant).double()
    weighted = float(((y - target.double()).square() * w0).sum() / (target.double().square() * w0).sum())
    report = run(copy.deepcopy(q), x, Reconstruction(iterations=25, images=8, batch_size=4, fisher=True))
    assert report.units[0].error_before == pytest.approx(weighted, rel=1e-10)
    assert report.units[0].error_before != pytest.approx(block_error(q, "0", x_quant, target), rel=1e-2)


def test_a_unit_whose_error_learning_raises_is_restored_bit_for_bit_and_reported():
    m, x, q = tiny_w4a4()
    calibrated = copy.deepcopy(q.state_dict())
    # steps and rounding learned far too fast: each block's error rises (0.0154 -> above, 0.0186 -> above)
    report = run(q, x, dataclasses.replace(FAST, lr_steps=1.0, lr_rounding=10.0, qdrop=0.5))
    assert report.restored() == ["blocks.0", "blocks.1"]
    assert all(u.error_after == u.error_before for u in report.units)
    assert q.state_dict().keys() == calibrated.keys()
    assert all(torch.equal(calibrated[k], v) for k, v in q.state_dict().items())
    assert report.summary().splitlines()[0] == "reconstructed 2 unit(s) on 8 image(s), 2 restored as calibrated"
    assert json.loads(json.dumps(report.as_dict()))["units"][1] == {
        "name": "blocks.1", "error_before": report.units[1].error_before,
        "error_after": report.units[1].error_before, "kept": False}


def _output_kl(float_model, q, x):
    """Mean KL(float ‖ quantized) of the class distributions, image by image (the plain-loop reference)."""
    total = 0.0
    with torch.no_grad():
        for i in range(len(x)):
            log_q = torch.log_softmax(q(x[i:i + 1]).double(), -1)
            log_p = torch.log_softmax(float_model(x[i:i + 1]).double(), -1)
            total += float((log_p.exp() * (log_p - log_q)).sum())
    return total / len(x)


NETWORK = dataclasses.replace(FAST, network_iterations=20)


def test_the_network_stage_lowers_the_output_kl_after_the_units_as_they_left_the_model():
    m, x, q = tiny_w4a4()     # the ptq4vit preset: no weight or bias replaced, each quantizer off is the float model
    units_only, float_model = copy.deepcopy(q), copy.deepcopy(q)
    float_model.set_quantization(False)
    first = run(units_only, x, dataclasses.replace(NETWORK, network_iterations=0))
    assert first.network is None
    report = run(q, x, NETWORK)
    assert report.units == first.units                     # the unit stage is the same with a network stage after it
    n = report.network
    assert n.iterations == 20 and n.kept and n.kl_after < n.kl_before
    # float32 logits in batches of 4 against one image at a time
    assert n.kl_before == pytest.approx(_output_kl(float_model, units_only, x), rel=1e-5)
    assert n.kl_after == pytest.approx(_output_kl(float_model, q, x), rel=1e-5)
    assert f"  network (20 steps): output KL {n.kl_before:.4g} -> {n.kl_after:.4g}" in report.summary().splitlines()
    assert report.held_fixed == first.held_fixed == {"TwinGeluQuantizer": 2, "TwinSoftmaxQuantizer": 2}
    assert json.loads(json.dumps(report.as_dict()))["network"] == {
        "iterations": 20, "kl_before": n.kl_before, "kl_after": n.kl_after, "kept": True}
    moved = 0
    for (name, site), old in zip(q.sites().items(), units_only.sites().values()):
        wq = getattr(site, "w_quant", None)
        if wq is None:
            continue
        w = site.weight.detach()
        assert torch.equal(wq.fake_quant(w), w), name          # every weight on its grid, the patch conv's too
        moved += int((w != old.weight.detach()).sum())
    assert moved > 0                                       # the rounding went on moving


def test_the_network_stage_without_rounding_moves_only_steps_and_is_seeded():
    m, x, q = tiny_w4a4()
    units_only = copy.deepcopy(q)
    steps_only = dataclasses.replace(NETWORK, network_rounding=False, qdrop=0.0, network_iterations=100)
    run(units_only, x, dataclasses.replace(steps_only, network_iterations=0, network_rounding=True))
    a, b = copy.deepcopy(q), copy.deepcopy(q)
    assert run(a, x, steps_only).network.kept
    run(b, x, steps_only)
    w0, b0 = _weights_and_buffers(units_only)
    w, buf = _weights_and_buffers(a)
    assert all(torch.equal(w[n], w0[n]) for n in w0)
    assert not all(torch.equal(buf[n], b0[n]) for n in b0)
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_network_stage_learns_against_the_float_model_of_a_rotated_gptq_model():
    m, x = make_tiny_dinov2(depth=2)
    float_model = copy.deepcopy(m).eval()
    q = ptq4vit.quantize(m, x, "rotq", 4, 4, progress=False, n_candidates=4, rounds=1, threads=1,
                         reconstruction=Reconstruction(iterations=10, images=4, batch_size=2, network_iterations=10,
                                                       qdrop=0.0))
    n = q.reconstruction_report.network
    assert n.kept and n.kl_after < n.kl_before
    # against the float model itself: not GPTQ's rounding, not the weights the units wrote (the rotated float
    # model's logits differ from the unrotated one's in their last bits: 1.5e-5 of the KL)
    assert n.kl_after == pytest.approx(_output_kl(float_model, q, x[:4]), rel=1e-4)


def test_the_network_stage_learns_at_its_own_rates_not_the_units():
    m, x, q = tiny_w4a4()
    # the units' rates are so fast that each unit is restored; at those rates the network stage diverges too
    # (the next test), at its own it lowers the KL
    report = run(q, x, Reconstruction(iterations=25, images=8, batch_size=4, lr_steps=1.0, lr_rounding=10.0,
                                      qdrop=0.5, network_iterations=5))
    assert report.restored() == ["blocks.0", "blocks.1"]
    assert report.network.kept and report.network.kl_after < report.network.kl_before


def test_a_network_stage_that_raises_the_kl_is_restored_bit_for_bit():
    m, x, q = tiny_w4a4()
    calibrated, float_model = copy.deepcopy(q.state_dict()), copy.deepcopy(q)
    float_model.set_quantization(False)
    # far too fast for the units (each restored, as in the test above) and for the network stage after them
    report = run(q, x, Reconstruction(iterations=25, images=8, batch_size=4, lr_steps=1.0, lr_rounding=10.0,
                                      qdrop=0.5, network_iterations=5, network_lr_steps=1.0, network_lr_rounding=10.0))
    assert report.restored() == ["blocks.0", "blocks.1", "network"]
    assert report.network.kl_after == report.network.kl_before == pytest.approx(_output_kl(float_model, q, x), rel=1e-5)
    assert "  network (5 steps): output KL" in report.summary() and report.summary().count("(restored)") == 3
    assert all(torch.equal(calibrated[k], v) for k, v in q.state_dict().items())


def test_with_changes_puts_back_the_settings_the_changed_options_would_not_read():
    units = Reconstruction(rounding="adaround", warmup=0.5, lr_rounding=0.01, lr_steps=0.02, network_iterations=5,
                           network_rounding=False, network_lr_steps=0.003)
    stage = units.with_changes(learn_rounding=False, lr_rounding=0.5, lr_steps=0.003)
    assert (stage.learn_rounding, stage.rounding, stage.warmup, stage.lr_rounding) == (False, "sign", 0.2, 5e-3)
    assert (stage.lr_steps, stage.network_lr_steps, stage.network_rounding) == (0.003, 0.003, True)  # unread now
    assert units.with_changes(lr_steps=0.5) == dataclasses.replace(units, lr_steps=0.5)  # all read: as replace
    no_steps = Reconstruction(lr_steps=0.02).with_changes(learn_steps=False)
    assert (no_steps.learn_steps, no_steps.lr_steps) == (False, 1e-3)


def test_bad_options_and_a_pool_over_the_memory_budget_are_refused_before_anything_changes():
    with pytest.raises(UserError, match="reconstruction field qdrop must be a finite number, got 'x'"):
        Reconstruction(qdrop="x")
    with pytest.raises(UserError, match=r"reconstruction.qdrop must be a probability in \[0, 1\), got 1.0"):
        Reconstruction(qdrop=1)
    with pytest.raises(UserError, match="reconstruction.lr_bias must be positive, got 0.0"):
        Reconstruction(lr_bias=0)
    with pytest.raises(UserError, match="reconstruction field learn_bias must be True or False, got 'yes'"):
        Reconstruction(learn_bias="yes")
    with pytest.raises(UserError, match="reconstruction.learn_weight_steps learns the weight steps with the "
                                        "rounding: it needs learn_rounding=True and rounding='sign' \\(got "
                                        "learn_rounding=True, rounding='adaround'\\)"):
        Reconstruction(learn_weight_steps=True, rounding="adaround")
    with pytest.raises(UserError, match="it needs learn_rounding=True and rounding='sign' \\(got learn_rounding=False"):
        Reconstruction(learn_weight_steps=True, learn_rounding=False)
    with pytest.raises(UserError, match="reconstruction field unit must be one of 'block', 'sublayer'"):
        Reconstruction(unit="layer")
    with pytest.raises(UserError, match="reconstruction field rounding must be one of 'sign', 'adaround'"):
        Reconstruction(rounding="soft")
    for field, value in (("warmup", 0.5), ("beta_start", 10.0), ("beta_end", 1.0), ("rounding_weight", 0.1)):
        with pytest.raises(UserError, match=f"reconstruction.{field} is read only with rounding='adaround', which "
                                            f"this reconstruction does not do \\(got {field}={value}\\): drop it or "
                                            "set learn_rounding=True and rounding='adaround'"):
            Reconstruction(rounding="sign", **{field: value})
        Reconstruction(rounding="adaround", **{field: value})
    # a setting nothing would read: refused, and the same setting where it is read is accepted
    for unread, read in ((dict(learn_rounding=False, rounding="adaround"), dict(rounding="adaround")),
                         (dict(learn_rounding=False, lr_rounding=0.01), dict(lr_rounding=0.01)),
                         (dict(learn_steps=False, lr_steps=0.01), dict(learn_steps=False, learn_weight_steps=True,
                                                                       lr_steps=0.01)),
                         (dict(learn_steps=False, learn_twin_log=False), dict(learn_twin_log=False)),
                         (dict(lr_bias=0.01), dict(learn_bias=True, lr_bias=0.01)),
                         (dict(network_rounding=False), dict(network_iterations=5, network_rounding=False)),
                         (dict(network_iterations=5, network_rounding=False, network_lr_rounding=0.01),
                          dict(network_iterations=5, network_lr_rounding=0.01)),
                         (dict(network_lr_steps=0.01), dict(network_iterations=5, network_lr_steps=0.01)),
                         (dict(network_iterations=5, learn_steps=False, network_lr_steps=0.01),
                          dict(network_iterations=5, learn_steps=False, learn_weight_steps=True, network_lr_steps=0.01))):
        field = next(k for k in unread if k in read and k not in ("learn_steps", "network_iterations"))
        with pytest.raises(UserError, match=f"reconstruction.{field} is read only with .*, which this reconstruction "
                                            f"does not do \\(got {field}={unread[field]!r}\\): drop it or set "):
            Reconstruction(**unread)
        Reconstruction(**read)
    with pytest.raises(UserError, match="reconstruction.network_iterations must be at least 0, got -1"):
        Reconstruction(network_iterations=-1)
    with pytest.raises(UserError, match="reconstruction.network_rounding goes on learning a sign rounding, but "
                                        "rounding='adaround': set network_rounding=False"):
        Reconstruction(network_iterations=5, rounding="adaround")
    Reconstruction(network_iterations=5, rounding="adaround", network_rounding=False)   # steps only: it can work
    with pytest.raises(UserError, match="reconstruction.network_lr_rounding must be positive, got 0"):
        Reconstruction(network_lr_rounding=0)
    with pytest.raises(UserError, match="reconstruction.network_lr_steps must be positive, got -0.1"):
        Reconstruction(network_lr_steps=-0.1)
    with pytest.raises(UserError, match="reconstruction.last_unit='features' and fisher=True are two ways to count "
                                        "the last unit's error"):
        Reconstruction(last_unit="features", fisher=True)
    with pytest.raises(UserError, match="reconstruction field last_unit must be one of 'auto', 'output', 'features', got 'cls'"):
        Reconstruction(last_unit="cls")
    m, x, q = tiny_w4a4()
    before = copy.deepcopy(q.state_dict())
    with pytest.raises(UserError, match="above the memory budget .* use fewer images"):
        reconstruct(q, x, FAST, progress=False, memory_budget=1000)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    fresh = ptq4vit.QuantizedModel(m, get_preset("ptq4vit"), 4, 4, "m")
    from ptq4vit.models import insert_quant_sites
    insert_quant_sites(fresh.model, fresh.preset, 4, 4)
    with pytest.raises(UserError, match="needs a calibrated model"):
        reconstruct(fresh, x, FAST, progress=False)


def test_learned_rounding_starts_where_gptq_left_each_weight_before_rounding_it(monkeypatch):
    m, x = make_tiny_dinov2(depth=2)
    fast = dict(progress=False, n_candidates=4, rounds=1, threads=1)
    options = Reconstruction(iterations=25, images=4, batch_size=2, fisher=False)
    seen = {}
    real = ptq4vit.api.reconstruct

    def spy(qmodel, images, opts, **kw):
        seen.update({n: (s.rounding_start.clone(), s.weight.detach().clone()) for n, s in qmodel.sites().items()
                     if getattr(s, "rounding_start", None) is not None})
        return real(qmodel, images, opts, **kw)
    monkeypatch.setattr(ptq4vit.api, "reconstruct", spy)
    q = ptq4vit.quantize(m, x, "rotq", 4, 4, reconstruction=options, **fast)
    sites = q.sites()
    assert sorted(seen) == sorted(n for n, s in sites.items() if isinstance(s, QuantLinear))  # every GPTQ layer
    for n, (start, gptq) in seen.items():
        assert torch.equal(sites[n].w_quant(start), gptq)      # its round to nearest is GPTQ's weight
    assert sum(not torch.equal(start, gptq) for start, gptq in seen.values()) == len(seen)
    assert all(getattr(s, "rounding_start", None) is None for s in sites.values())  # spent by reconstruction
    changed = 0
    for n, (start, gptq) in seen.items():
        if not n.startswith("blocks."):
            continue
        wq = sites[n].w_quant
        step = wq.scale.repeat_interleave(start.shape[0] // wq.groups).reshape(-1, 1)
        codes, low = wq.codes(sites[n].weight.detach()), torch.floor(start / step)
        n_max = qmax(wq.bits)
        assert bool(((codes == low.clamp(-n_max, n_max - 1)) | (codes == (low + 1).clamp(-n_max, n_max - 1))).all())
        changed += int((codes != wq.codes(gptq)).sum())
    assert changed > 0                                         # learning moved some of GPTQ's codes
    # nothing is kept where the rounding is not learned
    seen.clear()
    ptq4vit.quantize(m, x, "rotq", 4, 4, reconstruction=options, **{"reconstruction.learn_rounding": False}, **fast)
    assert seen == {}
    plain = ptq4vit.quantize(m, x, "rotq", 4, 4, **fast)
    assert all(getattr(s, "rounding_start", None) is None for s in plain.sites().values())


def test_targets_are_the_float_models_not_gptqs_rounding_nor_the_corrected_biases(monkeypatch):
    m, x = make_tiny_dinov2(depth=2)
    options = Reconstruction(iterations=5, images=4, batch_size=2)
    seen = {}
    real = ptq4vit.api.reconstruct

    def spy(qmodel, images, opts, **kw):
        replaced = _replaced_parameters(qmodel)
        seen["names"] = [n for n, _, _ in replaced]
        calibrated = [p.detach().clone() for _, p, _ in replaced]
        block0 = {}
        hook = qmodel.model.blocks[0].register_forward_hook(lambda mod, a, out: block0.update(x=a[0], y=out))
        with torch.no_grad():
            with _float_model(qmodel, replaced):
                seen["float"] = qmodel(x)
                target = block0["y"].double()
            with qmodel.quantization_disabled():
                seen["quantizers off"] = qmodel(x)
            qmodel(x)
        hook.remove()
        seen["put back"] = all(torch.equal(p, c) for (_, p, _), c in zip(replaced, calibrated))
        seen["error"] = float((block0["y"].double() - target).square().sum() / target.square().sum())
        return real(qmodel, images, opts, **kw)
    monkeypatch.setattr(ptq4vit.api, "reconstruct", spy)
    q = ptq4vit.quantize(m, x, "rotq", 4, 4, reconstruction=options, progress=False, n_candidates=4, rounds=1,
                         threads=1)
    linears = [n for n, s in q.sites().items() if isinstance(s, QuantLinear)]
    assert seen["names"] == [f"{n}.{p}" for n in linears for p in ("weight", "bias")]  # GPTQ and bias correction
    with torch.no_grad():
        ref = m(x)
    torch.testing.assert_close(seen["float"], ref, rtol=0, atol=1e-6)  # rotation is exact up to float rounding
    assert float((seen["quantizers off"] - ref).abs().max()) > 1e-2     # GPTQ's weights and the biases remain
    assert seen["put back"]
    assert q.reconstruction_report.units[0].error_before == pytest.approx(seen["error"], rel=1e-7)
    assert all(getattr(s, name, None) is None for s in q.sites().values()
               for name in ("float_weight", "float_bias"))              # spent by reconstruction
    # a model calibrated without them cannot be reconstructed against the float model: refused, unchanged
    plain = ptq4vit.quantize(m, x, "rotq", 4, 4, progress=False, n_candidates=4, rounds=1, threads=1)
    before = copy.deepcopy(plain.state_dict())
    with pytest.raises(UserError, match=r"calibration replaced 18 weight\(s\) or bias\(es\) .* first "
                                        r"blocks.0.attn.qkv.weight: quantize with the recipe's reconstruction set"):
        run(plain, x)
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())


def test_quantize_runs_the_recipes_reconstruction_on_its_pool(tmp_path):
    m, _ = make_tiny("vit")
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    pool = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    fast = dict(n_candidates=5, rounds=1, progress=False, threads=1)
    by_hand = ptq4vit.quantize(m, x, "ptq4vit", 4, 4, **fast)
    by_hand_report = run(by_hand, pool)
    q = ptq4vit.quantize(m, x, "ptq4vit", 4, 4, reconstruction=FAST, reconstruction_images=pool, **fast)
    assert all(torch.equal(a, b) for a, b in zip(q.state_dict().values(), by_hand.state_dict().values()))
    assert q.reconstruction_report == by_hand_report and q.reconstruction_report.images == FAST.images
    assert q.recipe.reconstruction == FAST
    # without a pool of its own, it learns on the calibration images
    on_calib = ptq4vit.quantize(m, x, "ptq4vit", 4, 4, reconstruction=FAST, **fast)
    again = ptq4vit.quantize(m, x, "ptq4vit", 4, 4, **fast)
    run(again, x)
    assert all(torch.equal(a, b) for a, b in zip(on_calib.state_dict().values(), again.state_dict().values()))
    # the checkpoint records how it was reconstructed and computes what the model does
    ptq4vit.save(q, tmp_path / "r.safetensors")
    loaded = ptq4vit.load(tmp_path / "r.safetensors")
    assert loaded.recipe == q.recipe
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_quantize_refuses_a_reconstruction_it_cannot_run_before_calibrating(monkeypatch):
    m, _ = make_tiny("vit")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with pytest.raises(UserError, match="reconstruction_images are given but the recipe's reconstruction is none"):
        ptq4vit.quantize(m, x, "ptq4vit", 4, 4, progress=False, reconstruction_images=x)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(UserError, match="reconstruction_images hold 1 of 12288 values that are not finite"):
        ptq4vit.quantize(m, x, "ptq4vit", 4, 4, progress=False, reconstruction="learned", reconstruction_images=bad)
    with pytest.raises(UserError, match="reconstruction learns in float32: the model's parameters are torch.bfloat16"):
        ptq4vit.quantize(copy.deepcopy(m).bfloat16(), x, "ptq4vit", 4, 4, progress=False, reconstruction="learned")
    unpooled = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=10,
                                 global_pool="").eval()
    calls = []
    monkeypatch.setattr(ptq4vit.api, "calibrate_model", lambda *a, **k: calls.append(a))
    with pytest.raises(UserError, match="last_unit='features' is not supported for a VisionTransformer with "
                                        "global_pool=''"):
        ptq4vit.quantize(unpooled, x, "ptq4vit", 4, 4, progress=False,
                         reconstruction=Reconstruction(last_unit="features", fisher=False))
    assert not calls


def test_a_sweep_reconstructs_on_the_calibration_draw_continued(tiny_cli_args, tmp_path, monkeypatch):
    from ptq4vit.harness.cli import main
    from ptq4vit.harness.data import ImageFolder, calibration_images
    from ptq4vit.harness.zoo import create
    seen = {}
    real = ptq4vit.quantize

    def spy(model, images, *args, **kwargs):
        seen.update(images=images, pool=kwargs["reconstruction_images"])
        seen["qmodel"] = real(model, images, *args, **kwargs)
        return seen["qmodel"]
    monkeypatch.setattr(ptq4vit, "quantize", spy)
    calib_dir = tiny_cli_args[tiny_cli_args.index("--calib-dir") + 1]
    assert main(["quantize", "--model", "vit_tiny_patch16_224", *tiny_cli_args, "--calib-size", "4", "--bits", "W4A4",
                 "--set", "reconstruction=learned", "--set", "reconstruction.images=6",
                 "--set", "reconstruction.iterations=2", "--out", str(tmp_path)]) == 0
    lm = create("vit_tiny_patch16_224", pretrained=False,
                model_kwargs=json.loads(tiny_cli_args[tiny_cli_args.index("--model-kwargs") + 1]))
    draw = calibration_images(ImageFolder(calib_dir, lm.transform()), 6, 3).images
    assert torch.equal(seen["pool"], draw) and torch.equal(seen["images"], draw[:4])
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert rows[-1]["reconstruction"] == seen["qmodel"].reconstruction_report.as_dict()  # the run's row keeps the report
    assert rows[-1]["reconstruction"]["images"] == 6

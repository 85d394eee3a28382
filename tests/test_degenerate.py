"""Degenerate data: all-zero and constant weights and activations give finite, positive scales."""
import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import ptq4vit
from ptq4vit.calib import calibrate_site
from ptq4vit.nn import QuantLinear, QuantMatMul
from ptq4vit.presets import get_preset
from ptq4vit.quant import (MIN_SCALE, TwinGeluQuantizer, TwinSoftmaxQuantizer, UniformQuantizer, initial_scale,
                           uniform_fake_quant)


FAST = dict(n_candidates=8, rounds=2)
BUDGET = 1 << 22


def _scales(module):
    return [b for name, b in module.named_buffers() if name.endswith(("scale", "split"))]


def _assert_finite_positive(module):
    for s in _scales(module):
        assert torch.isfinite(s).all() and (s > 0).all(), s


def test_initial_scale_of_zero_is_the_smallest_normal_float():
    s = initial_scale(torch.tensor([0.0, 2.55, 0.0]), 8)
    assert s.tolist() == [MIN_SCALE, pytest.approx(2.55 / 127.5), MIN_SCALE]
    assert MIN_SCALE == torch.finfo(torch.float32).tiny
    # Any positive Δ quantizes zeros exactly: no 0/0.
    assert torch.equal(uniform_fake_quant(torch.zeros(4), s[:1], 8), torch.zeros(4))


def _linear_site(weight, a_quant, bias=None):
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return QuantLinear(lin, UniformQuantizer(8, 3, axis=0), a_quant)


@pytest.mark.parametrize("metric", ["cosine", "mse", "hessian"])
@pytest.mark.parametrize("w_fill, x_fill", [(0.0, 0.0), (0.0, 0.7), (0.3, 0.0), (-0.25, 1.5)])
def test_zero_and_constant_linear_layers_get_finite_positive_scales(metric, w_fill, x_fill):
    site = _linear_site(torch.full((6, 4), w_fill), UniformQuantizer(8), bias=torch.zeros(6))
    x = torch.full((2, 5, 4), x_fill)
    grad = torch.ones(2, 5, 6)
    calibrate_site(site, [x], grad, get_preset("ptq4vit", metric=metric, **FAST), BUDGET)
    _assert_finite_positive(site)
    out = site(x)
    assert torch.isfinite(out).all()
    if w_fill == 0.0 or x_fill == 0.0:
        assert torch.equal(out, torch.zeros_like(out))  # zeros stay exactly zero


@pytest.mark.parametrize("x_fill", [0.0, -0.1])
def test_dead_post_gelu_input_gets_a_finite_positive_twin_scale(x_fill):
    # fc2 fed by a dead GELU: the positive range has max <= 0
    for pow2 in (False, True):
        site = _linear_site(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), TwinGeluQuantizer(8, pow2))
        x = torch.full((2, 5, 4), x_fill)
        calibrate_site(site, [x], torch.ones(2, 5, 6), get_preset("ptq4vit", gelu_pow2=pow2, **FAST), BUDGET)
        _assert_finite_positive(site)
        assert torch.isfinite(site(x)).all()


@pytest.mark.parametrize("softmax_twin", [False, True])
def test_an_all_zero_attention_head_gets_finite_positive_scales(softmax_twin):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 5, 4, generator=g)
    b = torch.randn(2, 3, 4, 5, generator=g)
    a[:, 1] = 0.0  # a dead head in q
    b[:, 2] = 0.0  # and another in k
    per_head = lambda: UniformQuantizer(8, 3, axis=1)
    site = QuantMatMul(TwinSoftmaxQuantizer(8) if softmax_twin else per_head(), per_head())
    if softmax_twin:
        a = a.softmax(-1)
        a[:, 1] = 0.0
    calibrate_site(site, [a, b], torch.ones(2, 3, 5, 5), get_preset("ptq4vit", **FAST), BUDGET)
    _assert_finite_positive(site)
    assert torch.isfinite(site(a, b)).all()


def test_zero_initialised_head_and_dead_channel_model_gives_finite_logits():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    heads = model.blocks[0].attn.num_heads
    dim = model.blocks[0].attn.head_dim
    with torch.no_grad():
        model.head.weight.zero_()                       # zero-initialised classifier
        model.head.bias.zero_()
        model.blocks[0].attn.qkv.weight[:dim].zero_()  # head 0 of q is dead: an all-zero matmul operand
        model.blocks[0].attn.qkv.bias[:dim].zero_()
        model.blocks[1].mlp.fc1.weight[:5].zero_()      # dead hidden channels
        model.blocks[1].mlp.fc1.bias[:5].zero_()
    assert heads > 1
    q = ptq4vit.quantize(model, images, "ptq4vit", 8, 8, progress=False, n_candidates=8, rounds=1)
    _assert_finite_positive(q)
    # Every candidate of an all-zero weight is floored at MIN_SCALE, so that is the choice.
    assert float(q.sites()["head"].w_quant.scale) == MIN_SCALE
    with torch.no_grad():
        logits = q(images)
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, torch.zeros_like(logits))  # a zero head gives zero logits, quantized too
    assert all(math.isfinite(v) for m in q.qparams()["modules"].values() for k, s in m.items() if k.endswith("scale")
               for v in (s if isinstance(s, list) else [s]))

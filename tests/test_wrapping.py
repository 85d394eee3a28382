"""Inserting quantization sites into timm models: layout, float equality, refusals."""
import copy

import pytest
import timm
import torch
from timm.layers import set_fused_attn
from torch import nn

from ptq4vit.models import UnsupportedModelError, insert_quant_sites
from ptq4vit.nn import QuantConv2d, QuantLinear, QuantMatMul
from ptq4vit.presets import get_preset
from ptq4vit.quant import TwinGeluQuantizer, TwinSoftmaxQuantizer, UniformQuantizer

from conftest import TINY_MODELS, make_tiny


def quantize_off(model, preset="ptq4vit"):
    q = copy.deepcopy(model)
    sites = insert_quant_sites(q, get_preset(preset), 8, 8)
    for m in q.modules():
        if hasattr(m, "enabled"):
            m.enabled = False
    return q, sites


@pytest.mark.parametrize("kind", ["vit", "deit_distilled", "swin"])
def test_switched_off_wrapping_reproduces_timm(kind):
    model, images = make_tiny(kind)
    q, _ = quantize_off(model)
    with torch.no_grad():
        got = q(images)
        want_fused = model(images)
        set_fused_attn(False)
        try:
            name, kwargs, _ = TINY_MODELS[kind]
            want = timm.create_model(name, pretrained=False, **kwargs)
            want.load_state_dict(model.state_dict())
            want = want.eval()(images)
        finally:
            set_fused_attn(True)
    if kind == "swin":  # head dim 32: (q @ k^T) * scale vs (q * scale) @ k^T differ by rounding
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # head dim 64: scale = 1/8 is exact, the outputs are bit-identical
        assert torch.equal(got, want)
    torch.testing.assert_close(got, want_fused, rtol=1e-4, atol=1e-4)


def test_vit_sites_follow_the_spec_table():
    model, _ = make_tiny("deit_distilled")
    _, sites = quantize_off(model, "ptq4vit")
    names = list(sites)
    assert names[0] == "patch_embed.proj" and names[-2:] == ["head", "head_dist"]
    assert names[1:7] == ["blocks.0.attn.qkv", "blocks.0.attn.matmul1", "blocks.0.attn.matmul2", "blocks.0.attn.proj",
                          "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert isinstance(sites["patch_embed.proj"], QuantConv2d)
    assert sites["patch_embed.proj"].w_quant.groups == model.patch_embed.proj.out_channels
    assert sites["blocks.0.attn.qkv"].w_quant.groups == 3
    assert isinstance(sites["blocks.0.mlp.fc2"].a_quant, TwinGeluQuantizer)
    mm2 = sites["blocks.0.attn.matmul2"]
    assert isinstance(mm2, QuantMatMul) and isinstance(mm2.a_quant, TwinSoftmaxQuantizer)
    assert mm2.b_quant.groups == model.blocks[0].attn.num_heads
    assert isinstance(sites["head"], QuantLinear)


def test_base_preset_has_no_twins_and_per_tensor_conv():
    model, _ = make_tiny("swin")
    _, sites = quantize_off(model, "base")
    assert "layers.1.downsample.reduction" in sites and "head.fc" in sites
    assert sites["patch_embed.proj"].w_quant.groups == 1
    assert all(not isinstance(m, (TwinGeluQuantizer, TwinSoftmaxQuantizer))
               for s in sites.values() for m in s.modules())
    assert isinstance(sites["layers.0.blocks.0.attn.matmul2"].a_quant, UniformQuantizer)


def test_unknown_attention_module_is_named():
    model, _ = make_tiny("vit")

    class MyAttention(nn.Module):
        def forward(self, x):
            return x

    model.blocks[1].attn = MyAttention()
    with pytest.raises(UnsupportedModelError, match=r"'blocks.1.attn' of type MyAttention"):
        insert_quant_sites(model, get_preset("ptq4vit"), 8, 8)


def test_stray_linear_is_named():
    model, _ = make_tiny("vit")
    model.blocks[0].ls1 = nn.Sequential(nn.Conv2d(1, 1, 1))
    with pytest.raises(UnsupportedModelError, match=r"'blocks.0.ls1.0' of type Conv2d"):
        insert_quant_sites(model, get_preset("ptq4vit"), 8, 8)


def test_unsupported_model_type_is_refused():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    with pytest.raises(UnsupportedModelError, match="ResNet is not supported"):
        insert_quant_sites(model, get_preset("ptq4vit"), 8, 8)


def test_bits_are_checked():
    model, _ = make_tiny("vit")
    with pytest.raises(ValueError, match="a_bits must be an integer from 2 to 8, got 9"):
        insert_quant_sites(model, get_preset("ptq4vit"), 8, 9)

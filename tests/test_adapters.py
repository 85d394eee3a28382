"""Model adapters: every supported layout gets exactly its expected sites and, switched off, computes
timm's output; every unknown structure is refused naming the module, and the model is left untouched."""
import copy
import pytest
import timm
import torch
from timm.models.vision_transformer import ParallelScalingBlock, ParallelThingsBlock, VisionTransformer
from torch import nn

from conftest import timm_unfused

from ptq4vit.errors import UnsupportedModelError
from ptq4vit.models import DEFAULT_ADAPTERS, SUPPORTED_MODELS, QuantAttention, QuantWindowAttention, insert_quant_sites
from ptq4vit.nn import QuantConv2d, QuantLinear, QuantMatMul
from ptq4vit.presets import get_preset
from ptq4vit.quant import Quantizer, TwinGeluQuantizer

# Head dim 16 everywhere: the attention scale 1/4 is a power of two, so applying it after q@kᵀ
# (ptq4vit) instead of before (timm) changes no bit, and switched-off outputs must be equal.
VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, num_classes=10)
SWIN_SHIFTED = dict(img_size=32, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                    num_classes=10)


def _vit(**kw):
    torch.manual_seed(0)
    return VisionTransformer(**{**VIT, **kw}).eval()


def _images(size=32, n=3):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _vit_sites(depth, heads=("head",)):
    per_block = ["attn.qkv", "attn.matmul1", "attn.matmul2", "attn.proj", "mlp.fc1", "mlp.fc2"]
    return ["patch_embed.proj", *[f"blocks.{i}.{s}" for i in range(depth) for s in per_block], *heads]


def _switched_off(model):
    q = copy.deepcopy(model)
    sites = insert_quant_sites(q, get_preset("ptq4vit"), 8, 8)
    for m in q.modules():
        if isinstance(m, Quantizer):
            m.enabled = False
    return q, sites


@pytest.mark.parametrize("variant, kwargs", [
    ("avg-pool, fc_norm, no class token", dict(global_pool="avg", fc_norm=True, class_token=False)),
    ("register tokens + LayerScale (DINOv2-style)", dict(reg_tokens=4, init_values=1e-5)),
    ("features only (no head)", dict(num_classes=0)),
])
def test_vit_variants_are_quantized_with_every_site_and_reproduce_timm_when_off(variant, kwargs):
    model = _vit(**kwargs)
    q, sites = _switched_off(model)
    heads = () if kwargs.get("num_classes") == 0 else ("head",)
    assert list(sites) == _vit_sites(2, heads), variant
    assert all(isinstance(q.blocks[i].attn, QuantAttention) for i in range(2))
    assert isinstance(sites["blocks.1.mlp.fc2"].a_quant, TwinGeluQuantizer)
    images = _images()
    with torch.no_grad():
        assert torch.equal(q(images), timm_unfused(model, images)), variant


def test_distilled_deit_quantizes_both_heads_and_reproduces_timm_when_off():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, **VIT).eval()
    q, sites = _switched_off(model)
    assert list(sites) == _vit_sites(2, ("head", "head_dist"))
    images = _images()
    with torch.no_grad():
        assert torch.equal(q(images), timm_unfused(model, images))


def test_swin_with_a_real_shift_mask_is_quantized_and_reproduces_timm_when_off():
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **SWIN_SHIFTED).eval()
    shifted = model.layers[0].blocks[1]
    assert tuple(shifted.shift_size) == (2, 2)
    assert shifted.attn_mask is not None and shifted.attn_mask.abs().sum() > 0  # the mask really masks
    q, sites = _switched_off(model)
    per_block = ["attn.qkv", "attn.matmul1", "attn.matmul2", "attn.proj", "mlp.fc1", "mlp.fc2"]
    want = ["patch_embed.proj",
            *[f"layers.0.blocks.{j}.{s}" for j in range(2) for s in per_block],
            "layers.1.downsample.reduction",
            *[f"layers.1.blocks.{j}.{s}" for j in range(2) for s in per_block],
            "head.fc"]
    assert list(sites) == want
    assert isinstance(q.layers[0].blocks[1].attn, QuantWindowAttention)
    images = _images()
    with torch.no_grad():
        assert torch.equal(q(images), timm_unfused(model, images))


def _refused(model, *patterns):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError) as err:
        insert_quant_sites(model, get_preset("ptq4vit"), 8, 8)
    for pattern in patterns:
        assert pattern in str(err.value), str(err.value)
    # Planning happens before any change: a refused model is left as it was.
    assert not any(isinstance(m, (QuantLinear, QuantConv2d, QuantMatMul)) for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    return str(err.value)


@pytest.mark.parametrize("block_fn, name", [(ParallelScalingBlock, "ParallelScalingBlock"),
                                            (ParallelThingsBlock, "ParallelThingsBlock")])
def test_parallel_blocks_are_refused_by_name(block_fn, name):
    msg = _refused(_vit(block_fn=block_fn), "'blocks.0'", name)
    assert "parallel" in msg


def test_mlp_with_a_norm_before_fc2_is_refused():
    model = _vit()
    # What timm builds for scale_mlp_norm=True (built by hand: older timm releases lack that argument).
    model.blocks[0].mlp = timm.layers.Mlp(32, 64, norm_layer=nn.LayerNorm)
    _refused(model, "'blocks.0.mlp.norm' of type LayerNorm", "scale_mlp_norm=True")


def test_attention_with_qk_norm_is_refused():
    _refused(_vit(qk_norm=True), "'blocks.0.attn.q_norm'", "qk_norm=True")


def test_attention_that_is_not_timms_attention_is_refused():
    model = _vit()

    class OtherAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(32, 96)

        def forward(self, x):
            return x

    model.blocks[1].attn = OtherAttention()
    _refused(model, "'blocks.1.attn' of type OtherAttention", "Attention")


def test_attention_pool_head_with_qk_norm_is_refused():
    model = _vit(global_pool="map", class_token=False)  # the attention pool itself is planned (test_families_timm.py)
    model.attn_pool.q_norm = nn.LayerNorm(16)
    _refused(model, "'attn_pool.q_norm' of type LayerNorm", "qk_norm=True")


def test_stray_linear_next_to_the_blocks_is_refused():
    model = _vit()
    model.blocks[0].adapter = nn.Linear(32, 32)
    _refused(model, "'blocks.0.adapter' of type Linear", "stray Linear")


def test_stray_linear_in_place_of_a_norm_is_refused():
    model = _vit()
    model.norm = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 32))
    _refused(model, "'norm.1' of type Linear", "stray Linear")


def test_stray_conv_inside_a_replaced_attention_is_refused():
    model = _vit()
    model.blocks[0].attn.extra = nn.Conv1d(4, 4, 1)
    _refused(model, "'blocks.0.attn.extra' of type Conv1d", "stray Conv1d")


def test_a_linear_hidden_in_an_allowed_float_type_is_refused():
    class NormWithLinear(nn.LayerNorm):
        def __init__(self):
            super().__init__(32)
            self.extra = nn.Linear(32, 32)

    model = _vit()
    model.blocks[1].norm2 = NormWithLinear()
    _refused(model, "'blocks.1.norm2.extra' of type Linear", "stray Linear")


def test_a_non_gelu_mlp_is_refused_with_the_gelu_twin_and_quantized_without_it():
    model = _vit(act_layer=nn.SiLU)
    _refused(model, "'blocks.0.mlp.act' of type SiLU", "needs nn.GELU")
    sites = insert_quant_sites(model, get_preset("ptq4vit", gelu_twin=False), 8, 8)
    assert not isinstance(sites["blocks.0.mlp.fc2"].a_quant, TwinGeluQuantizer)


def test_unknown_float_module_is_refused():
    model = _vit()
    model.blocks[0].ls1 = nn.BatchNorm1d(32)
    _refused(model, "'blocks.0.ls1' of type BatchNorm1d", "layer scale")


def test_a_subclass_of_a_supported_model_is_not_assumed_alike():
    class MyViT(VisionTransformer):
        pass

    torch.manual_seed(0)
    with pytest.raises(UnsupportedModelError, match="model type MyViT is not supported"):
        insert_quant_sites(MyViT(**VIT), get_preset("ptq4vit"), 8, 8)


def test_registry_maps_exact_classes_to_one_adapter_each():
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.beit import Beit
    from timm.models.eva import Eva
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    from torchvision.models import SwinTransformer as TorchvisionSwinTransformer
    from torchvision.models import VisionTransformer as TorchvisionVisionTransformer
    assert set(SUPPORTED_MODELS) == {VisionTransformer, VisionTransformerDistilled, SwinTransformer, Beit, Eva,
                                     SwinTransformerV2, TorchvisionVisionTransformer, TorchvisionSwinTransformer}
    assert DEFAULT_ADAPTERS.adapter_for(_vit()).family == "timm VisionTransformer"
    with pytest.raises(ValueError, match="two adapters claim VisionTransformer"):
        DEFAULT_ADAPTERS.with_adapter(DEFAULT_ADAPTERS.adapters[0])

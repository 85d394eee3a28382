"""Reconstruction on every family whose adapter states its blocks (timm, torchvision, Hugging Face; docs/lowbit.md
§11): each unit calls its block as the model does (EVA's rotary embedding, BEiT's shared position bias),
and each family states the features its classifier reads for ``last_unit="features"`` or refuses them."""
import copy
import re

import pytest
import timm
import torch
import torchvision
from torch import nn
from timm.models.vision_transformer import Block

from ptq4vit import Reconstruction, UserError, reconstruct
from ptq4vit.calib.reconstruct import _block_inputs
from ptq4vit.calib.units import SUBLAYER_SPLITS, Unit, bind_block_arguments, reconstruction_units
from ptq4vit.models import DEFAULT_ADAPTERS, UnsupportedModelError

from _family_checks import move_off_init
from _fastq import fast_quantize

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
TIMM = {
    "vit": ("vit_tiny_patch16_224", dict(TINY, global_pool="avg", fc_norm=True)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", TINY),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=56, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
                                                  num_classes=10)),
    "swinv2": ("swinv2_tiny_window8_256", dict(img_size=32, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2),
                                               num_heads=(2, 2), num_classes=10)),
    "beit": ("beit_base_patch16_224", TINY),
    "beit-shared-bias": ("beit_base_patch16_224", dict(TINY, use_shared_rel_pos_bias=True, use_rel_pos_bias=False)),
    "eva02": ("eva02_tiny_patch14_224", TINY),
    "eva02-base-layout": ("eva02_base_patch14_224", TINY),
}
HF_TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64)
#: Hugging Face model class -> its config class and extra config.
HF = {
    "ViTForImageClassification": ("ViTConfig", dict(num_labels=10)),
    "DeiTForImageClassificationWithTeacher": ("DeiTConfig", dict(num_labels=10)),
    "Dinov2ForImageClassification": ("Dinov2Config", dict(num_labels=10, mlp_ratio=2)),
    "CLIPVisionModel": ("CLIPVisionConfig", {}),
    "SiglipVisionModel": ("SiglipVisionConfig", {}),
}
FAMILIES = [*TIMM, "torchvision-vit", "torchvision-swin", *HF]
#: The families whose blocks the model calls with more than their input.
CALLED_WITH_MORE = {"beit-shared-bias", "eva02", "eva02-base-layout"}
#: The families whose blocks take an argument the model passes as None (the attention mask, positionally).
TAKE_NONE = {"CLIPVisionModel", "SiglipVisionModel"}
#: The families whose adapter states what the classifier reads, and that classifier's path(s).
CLASSIFIERS = {**{k: ["head"] for k in TIMM}, "swin": ["head.fc"], "swinv2": ["head.fc"],
               "deit_distilled": ["head", "head_dist"], "torchvision-vit": ["heads.head"], "torchvision-swin": ["head"],
               "ViTForImageClassification": ["classifier"], "Dinov2ForImageClassification": ["classifier"],
               "DeiTForImageClassificationWithTeacher": ["cls_classifier", "distillation_classifier"]}


def tiny(kind: str, **kwargs):
    """A tiny model of ``kind`` off its constant inits (zero position bias tables, unit norms, zero biases),
    which would hide an argument left out, and 6 images."""
    torch.manual_seed(0)
    if kind in TIMM:
        name, defaults = TIMM[kind]
        model = timm.create_model(name, pretrained=False, **{**defaults, **kwargs})
    elif kind == "torchvision-vit":
        model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                     hidden_dim=32, mlp_dim=64, num_classes=10, **kwargs)
    elif kind == "torchvision-swin":
        model = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                                   window_size=[4, 4], num_classes=10, **kwargs)
    else:
        transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")
        config, extra = HF[kind]
        model = getattr(transformers, kind)(getattr(transformers, config)(**HF_TINY, **extra, **kwargs,
                                                                          attn_implementation="eager"))
    move_off_init(model.eval(), 0.05, names=("relative_position_bias_table", "bias"), vectors=True,
                  generator=torch.Generator().manual_seed(1))
    size = 56 if kind == "swin" else 32
    return model, torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(2))


def block_outputs(model, paths, x):
    """Each block's output in a pass of ``model`` over ``x``."""
    modules, seen = dict(model.named_modules()), {}
    handles = [modules[p].register_forward_hook(lambda m, a, out, p=p: seen.setdefault(p, out.detach()))
               for p in paths]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("kind", FAMILIES)
def test_each_unit_calls_its_block_as_the_model_does(kind):
    m, x = tiny(kind)
    q = fast_quantize(m, x, "ptq4vit", 8, 8)
    plain = reconstruction_units(q.model, "block")
    units = bind_block_arguments(q.model, plain, x)
    blocks = dict(q.model.named_modules())
    outputs = block_outputs(q.model, [u.block for u in units], x)
    with torch.no_grad():
        for u, p in zip(units, plain):
            x_in = _block_inputs(q.model, blocks[u.block], x, 3)
            assert torch.equal(u.forward(x_in), outputs[u.block]), u.name
            if kind not in TAKE_NONE:  # called with its input alone, another function where the model passes more
                assert torch.equal(p.forward(x_in), outputs[u.block]) == (kind not in CALLED_WITH_MORE), u.name


@pytest.mark.parametrize("kind", ["eva02", "beit-shared-bias", "torchvision-vit", "torchvision-swin",
                                  "Dinov2ForImageClassification", "SiglipVisionModel"])
def test_reconstruction_learns_each_block_against_the_function_the_model_computes(kind):
    m, x = tiny(kind)
    q = fast_quantize(m, x, "ptq4vit", 4, 4)
    paths = [u.block for u in reconstruction_units(q.model, "block")]
    with torch.no_grad():   # the plain reference: block outputs of passes of the quantized and the float model
        quant = block_outputs(q.model, paths, x)
        with q.quantization_disabled():
            target = block_outputs(q.model, paths, x)
    y, t = quant[paths[0]].double(), target[paths[0]].double()
    report = reconstruct(copy.deepcopy(q), x, Reconstruction(iterations=2, images=6, batch_size=3, learn_rounding=False,
                                                              learn_steps=False), progress=False, threads=1)
    assert report.units[0].error_before == pytest.approx(float((y - t).square().sum() / t.square().sum()), rel=1e-6)
    last_unit = "features" if kind in CLASSIFIERS else "output"
    learned = reconstruct(copy.deepcopy(q), x, Reconstruction(iterations=20, images=6, batch_size=3,
                                                              last_unit=last_unit), progress=False, threads=1)
    assert all(u.error_after <= u.error_before for u in learned.units)
    assert any(u.error_after < u.error_before for u in learned.units)


class MaskedBlocks(nn.Module):
    """Two timm blocks called with an attention mask: the same for every batch, or one per image."""

    def __init__(self, per_image: bool):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(16, 2), Block(16, 2)]).eval()
        self.per_image = per_image

    def forward(self, x):
        mask = torch.zeros(len(x) if self.per_image else 1, 1, x.shape[1], x.shape[1], dtype=torch.bool)
        mask[..., 0] = True
        for blk in self.blocks:
            x = blk(x, attn_mask=mask)
        return x


def units_of(model, sublayer=False):
    if sublayer:
        return [u for i, blk in enumerate(model.blocks) for u in SUBLAYER_SPLITS.get(blk)(f"blocks.{i}", blk, False)]
    return [Unit(f"blocks.{i}", blk, (blk,), blk, f"blocks.{i}", False) for i, blk in enumerate(model.blocks)]


def test_block_arguments_that_change_with_the_images_or_that_a_split_would_drop_are_refused():
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    model = MaskedBlocks(per_image=False)
    units = bind_block_arguments(model, units_of(model), x)
    outputs = block_outputs(model, ["blocks.0", "blocks.1"], x)
    with torch.no_grad():
        assert torch.equal(units[1].forward(_block_inputs(model, model.blocks[1], x, 3)), outputs["blocks.1"])
    with pytest.raises(UserError, match=re.escape("reconstruction unit 'sublayer' cannot split block 'blocks.0' "
                                                  "(Block): the model calls it with 'attn_mask' besides its input; "
                                                  "use unit='block'")):
        bind_block_arguments(model, units_of(model, sublayer=True), x)
    with pytest.raises(UserError, match=re.escape("block 'blocks.0' (Block) is called with 'attn_mask', which changes "
                                                  "with the images")):
        bind_block_arguments(MaskedBlocks(per_image=True), units_of(model), x)
    tupled = MaskedBlocks(per_image=False)
    tupled.forward = lambda x: (tupled.blocks[0](x),)
    tupled.blocks[0].forward = lambda x, attn_mask=None, f=tupled.blocks[0].forward: (f(x, attn_mask),)
    with pytest.raises(UserError, match=re.escape("block 'blocks.0' (Block) returns a tuple, not its tokens: "
                                                  "reconstruction cannot replay it")):
        bind_block_arguments(tupled, units_of(tupled)[:1], x)
    model.blocks.append(Block(16, 2))        # a block the forward never calls
    model.forward = lambda x: model.blocks[1](model.blocks[0](x))
    with pytest.raises(UserError, match=re.escape("block 'blocks.2' (Block) is not called in a pass of the model")):
        bind_block_arguments(model, units_of(model), x)


@pytest.mark.parametrize("kind", sorted(CLASSIFIERS))
def test_each_family_states_the_features_its_classifier_reads(kind):
    m, x = tiny(kind)
    q = fast_quantize(m, x, "ptq4vit", 8, 8)
    last = reconstruction_units(q.model, "block")[-1].block
    read = DEFAULT_ADAPTERS.adapter_for(q.model).head_features(q.model)
    seen = []
    handles = [q.model.get_submodule(path).register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
               for path in CLASSIFIERS[kind]]
    with torch.no_grad():
        out = block_outputs(q.model, [last], x)[last]
    for h in handles:
        h.remove()
    # distilled DeiT: two heads, each reading its own token
    assert torch.equal(read(out), seen[0] if len(seen) == 1 else torch.stack(seen, dim=1))


@pytest.mark.parametrize("kind, pool", [("swin", ""), ("swinv2", ""), ("beit", ""), ("eva02", ""), ("eva02", "map")])
def test_a_family_refuses_features_where_nothing_is_pooled_or_an_attention_pool_reads_them(kind, pool):
    m, _ = tiny(kind, global_pool=pool)
    why = "it outputs every token" if pool == "" else "its attention pool holds quantization sites"
    with pytest.raises(UnsupportedModelError, match=f"last_unit='features' is not supported for a "
                                                    f"{type(m).__name__} with global_pool='{pool}': {why}"):
        DEFAULT_ADAPTERS.adapter_for(m).head_features(m)


def test_quantize_refuses_a_family_that_states_no_blocks_before_calibrating(monkeypatch):
    import ptq4vit
    calls = []
    monkeypatch.setattr(ptq4vit.api, "calibrate_model", lambda *a, **k: calls.append(a))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")
    swin = transformers.SwinForImageClassification(transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 2], window_size=4, num_labels=10)).eval()
    with pytest.raises(UserError, match=re.escape("reconstruction is not supported for SwinForImageClassification by "
                                                  "the Hugging Face Swin adapter: it does not state the model's "
                                                  "blocks")):
        ptq4vit.quantize(swin, x, "ptq4vit", 4, 4, progress=False, reconstruction="learned")
    assert not calls


def test_torchvision_vit_refuses_features_behind_a_quantized_representation_layer():
    m, _ = tiny("torchvision-vit", representation_size=16)
    with pytest.raises(UnsupportedModelError, match=re.escape("last_unit='features' is not supported for a "
                                                              "VisionTransformer with representation_size: its "
                                                              "heads.pre_logits is a quantization site")):
        DEFAULT_ADAPTERS.adapter_for(m).head_features(m)


def test_a_family_that_does_not_state_its_features_refuses_them_by_name():
    m, _ = tiny("CLIPVisionModel")
    with pytest.raises(UnsupportedModelError, match=re.escape("last_unit='features' is not supported for "
                                                              "CLIPVisionModel by the Hugging Face CLIP")):
        DEFAULT_ADAPTERS.adapter_for(m).head_features(m)

"""Reconstruction on every timm family with blocks (docs/lowbit.md §11): each unit calls its block as the
model does (EVA's rotary embedding, BEiT's shared position bias), and each family states the features
its classifier reads for ``last_unit="features"``."""
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
FAMILIES = {
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
#: The families whose blocks the model calls with more than their input.
CALLED_WITH_MORE = {"beit-shared-bias", "eva02", "eva02-base-layout"}


def tiny(kind: str, **kwargs):
    name, defaults = FAMILIES[kind]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **{**defaults, **kwargs}).eval()
    # off the constant inits (zero position bias tables, unit norms), which would hide an argument left out
    move_off_init(model, 0.05, names=("relative_position_bias_table",), vectors=True,
                  generator=torch.Generator().manual_seed(1))
    size = model.patch_embed.img_size[0]
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


@pytest.mark.parametrize("kind", sorted(FAMILIES))
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
            # the block called with its input alone computes another function where the model passes more
            assert torch.equal(p.forward(x_in), outputs[u.block]) == (kind not in CALLED_WITH_MORE), u.name


@pytest.mark.parametrize("kind", ["eva02", "beit-shared-bias"])
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
    learned = reconstruct(copy.deepcopy(q), x, Reconstruction(iterations=20, images=6, batch_size=3,
                                                              last_unit="features"), progress=False, threads=1)
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
    model.blocks.append(Block(16, 2))        # a block the forward never calls
    model.forward = lambda x: model.blocks[1](model.blocks[0](x))
    with pytest.raises(UserError, match=re.escape("block 'blocks.2' (Block) is not called in a pass of the model")):
        bind_block_arguments(model, units_of(model), x)


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_each_family_states_the_features_its_classifier_reads(kind):
    m, x = tiny(kind)
    q = fast_quantize(m, x, "ptq4vit", 8, 8)
    last = reconstruction_units(q.model, "block")[-1].block
    read = DEFAULT_ADAPTERS.adapter_for(q.model).head_features(q.model)
    heads = q.model.get_classifier()     # distilled DeiT: its head and its distillation head
    heads = list(heads) if isinstance(heads, tuple) else [heads]
    seen = []
    handles = [h.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach())) for h in heads]
    with torch.no_grad():
        out = block_outputs(q.model, [last], x)[last]
    for h in handles:
        h.remove()
    features = read(out)
    if kind == "deit_distilled":     # two heads, each reading its own token
        assert torch.equal(features, torch.stack(seen, dim=1))
    else:
        assert torch.equal(features, seen[-1])


@pytest.mark.parametrize("kind, pool", [("swin", ""), ("swinv2", ""), ("beit", ""), ("eva02", ""), ("eva02", "map")])
def test_a_family_refuses_features_where_nothing_is_pooled_or_an_attention_pool_reads_them(kind, pool):
    m, _ = tiny(kind, global_pool=pool)
    why = "it outputs every token" if pool == "" else "its attention pool holds quantization sites"
    with pytest.raises(UnsupportedModelError, match=f"last_unit='features' is not supported for a "
                                                    f"{type(m).__name__} with global_pool='{pool}': {why}"):
        DEFAULT_ADAPTERS.adapter_for(m).head_features(m)


def test_quantize_refuses_blocks_it_cannot_replay_before_calibrating(monkeypatch):
    import ptq4vit
    calls = []
    monkeypatch.setattr(ptq4vit.api, "calibrate_model", lambda *a, **k: calls.append(a))
    tv = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=48,
                                              mlp_dim=96, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="^VisionTransformer has no transformer blocks to reconstruct"):
        ptq4vit.quantize(tv, x, "ptq4vit", 4, 4, progress=False, reconstruction="learned")
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")
    swin = transformers.SwinForImageClassification(transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 2], window_size=4, num_labels=10)).eval()
    with pytest.raises(UserError, match=re.escape("block 'swin.encoder.layers.0.blocks.0' (SwinLayer) returns a tuple, "
                                                  "not its tokens: reconstruction cannot replay it")):
        ptq4vit.quantize(swin, x, "ptq4vit", 4, 4, progress=False, reconstruction="learned")
    assert not calls

"""A model family from outside ptq4vit, added by registering an adapter: ``quantize``, ``save`` and
``load`` (and the rotation and RepQ-ViT's reparameterization inside them) ask the registry they are
given, and without it the model is refused by name."""
import re

import pytest
import torch
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention
from torch import nn

import ptq4vit
from ptq4vit import DEFAULT_ADAPTERS, Adapter, CheckpointError, SitePlan, UnsupportedModelError
from ptq4vit.models import (NORMS, AttentionHeads, BlockRotation, NormReaders, OnlineSlot, ResidualBranch,
                            ResidualStream, RotationLayout, check_affine_norm)
from ptq4vit.models.create_args import POSITIVE_INT
from ptq4vit.transforms import OnlineRotation, RMSNorm


class PreNormBlock(nn.Module):
    """timm's Block layout (without LayerScale or dropout) in a class of its own."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PoolNet(nn.Module):
    """Patch embedding, position embedding, pre-norm blocks, a final norm, average pool, a linear head."""

    def __init__(self, num_classes: int = 10, img_size=32, in_chans: int = 3, dim: int = 32, depth: int = 2,
                 num_heads: int = 2):
        super().__init__()
        self.num_classes = num_classes
        self.dim = dim
        self.patch_embed = PatchEmbed(img_size, 8, in_chans, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches, dim) * 0.1)
        self.blocks = nn.Sequential(*[PreNormBlock(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.patch_embed(x) + self.pos_embed)
        return self.head(self.norm(x).mean(1))


class PoolNetAdapter(Adapter):
    family = "PoolNet"
    model_classes = (PoolNet,)
    architectures = ("PoolNet",)
    create_args = {"dim": POSITIVE_INT, "depth": POSITIVE_INT, "num_heads": POSITIVE_INT}

    def create_model(self, name, **kwargs):
        return PoolNet(**kwargs)

    def create_kwargs(self, model):
        return {"dim": model.dim, "depth": len(model.blocks), "num_heads": model.blocks[0].attn.num_heads}

    def plan(self, model, build):
        p = SitePlan(self.family)
        p.container("")
        p.patch_embed("patch_embed", model.patch_embed, build)
        p.container("blocks")
        for i, block in enumerate(model.blocks):
            path = f"blocks.{i}"
            if type(block) is not PreNormBlock:
                raise p.refuse(path, block, "only PreNormBlock is a known block layout")
            p.container(path)
            p.keep_float(f"{path}.norm1", block.norm1, NORMS, "norm")
            p.attention(f"{path}.attn", block.attn, build)
            p.keep_float(f"{path}.norm2", block.norm2, NORMS, "norm")
            p.mlp(f"{path}.mlp", block.mlp, build)
        p.keep_float("norm", model.norm, NORMS, "norm")
        p.site("head", model.head, nn.Linear, build.classifier)
        return p

    def norm_linear_pairs(self, model):
        pairs = []
        for i, block in enumerate(model.blocks):
            for norm, linear in (("norm1", "attn.qkv"), ("norm2", "mlp.fc1")):
                check_affine_norm(f"blocks.{i}.{norm}", getattr(block, norm), self.family)
                pairs.append((f"blocks.{i}.{norm}", f"blocks.{i}.{linear}"))
        return pairs

    def rotation_layout(self, model, residual):
        blocks = tuple(BlockRotation(AttentionHeads(b.attn.qkv, b.attn.proj, b.attn.num_heads, b.attn.head_dim),
                                     OnlineSlot(b.mlp, "norm", b.mlp.fc2)) for b in model.blocks)
        if not residual:
            return RotationLayout(blocks)
        branches = tuple(ResidualBranch(NormReaders(b, norm, (reader,)), writer) for b in model.blocks
                         for norm, reader, writer in (("norm1", b.attn.qkv, b.attn.proj), ("norm2", b.mlp.fc1, b.mlp.fc2)))
        stream = ResidualStream(model.dim, (model.patch_embed.proj,), (model.pos_embed,), branches,
                                NormReaders(model, "norm", (model.head,)))
        return RotationLayout(blocks, stream)


ADAPTERS = DEFAULT_ADAPTERS.with_adapter(PoolNetAdapter())
FAST = dict(progress=False, n_candidates=4, rounds=1)


def _model_and_images():
    torch.manual_seed(0)
    model = PoolNet().eval()
    with torch.no_grad():  # norms with an affine that is not the identity, so that folding it matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape) * 0.3)
    return model, torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_quantize_save_and_load_a_registered_family(tmp_path):
    model, x = _model_and_images()
    q = ptq4vit.quantize(model, x, "ptq4vit", adapters=ADAPTERS, **FAST)
    assert list(q.sites()) == ["patch_embed.proj", *[f"blocks.{i}.{s}" for i in range(2) for s in (
        "attn.qkv", "attn.matmul1", "attn.matmul2", "attn.proj", "mlp.fc1", "mlp.fc2")], "head"]
    ptq4vit.save(q, tmp_path / "q.safetensors", adapters=ADAPTERS)
    meta = ptq4vit.checkpoint.read_metadata(tmp_path / "q.safetensors", adapters=ADAPTERS)
    assert (meta["model"]["name"], meta["model"]["create_kwargs"]) == (
        "PoolNet", {"num_classes": 10, "img_size": [32, 32], "in_chans": 3})
    # rebuilt by the adapter's create_model, and from the float model: the same outputs bit for bit
    assert torch.equal(ptq4vit.load(tmp_path / "q.safetensors", adapters=ADAPTERS)(x), q(x))
    assert torch.equal(ptq4vit.load(tmp_path / "q.safetensors", model, adapters=ADAPTERS)(x), q(x))


def test_architecture_arguments_are_read_off_the_model_by_the_adapter(tmp_path):
    torch.manual_seed(0)
    model, x = PoolNet(dim=24, depth=1, num_heads=3).eval(), torch.randn(2, 3, 32, 32)
    q = ptq4vit.quantize(model, x, "base", adapters=ADAPTERS, **FAST)
    meta = ptq4vit.save(q, tmp_path / "q.safetensors", adapters=ADAPTERS)
    assert meta["model"]["create_kwargs"] == {"num_classes": 10, "img_size": [32, 32], "in_chans": 3, "dim": 24,
                                              "depth": 1, "num_heads": 3}
    assert torch.equal(ptq4vit.load(tmp_path / "q.safetensors", adapters=ADAPTERS)(x), q(x))


def test_without_the_registry_the_family_is_refused_by_name(tmp_path):
    model, x = _model_and_images()
    with pytest.raises(UnsupportedModelError, match="^model type PoolNet is not supported; the adapter registry has "
                                                    "adapters for timm.models.vision_transformer.VisionTransformer, "):
        ptq4vit.quantize(model, x, "ptq4vit", **FAST)
    q = ptq4vit.quantize(model, x, "base", adapters=ADAPTERS, **FAST)
    with pytest.raises(UnsupportedModelError, match="^model type PoolNet is not supported"):
        ptq4vit.save(q, tmp_path / "q.safetensors")
    assert not (tmp_path / "q.safetensors").exists()
    ptq4vit.save(q, tmp_path / "q.safetensors", adapters=ADAPTERS)
    for load in (lambda: ptq4vit.load(tmp_path / "q.safetensors"), lambda: ptq4vit.load(tmp_path / "q.safetensors", model)):
        with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'q.safetensors'}: 'PoolNet' is not a model "
                                                            f"name timm")):
            load()


def test_a_model_name_has_one_adapter():
    class Another(PoolNetAdapter):
        family = "another PoolNet"
        model_classes = ()

    with pytest.raises(ValueError, match="^two adapters build the model name 'PoolNet': PoolNet and another PoolNet$"):
        ADAPTERS.with_adapter(Another())


def test_rotation_folds_where_the_registered_adapter_says():
    model, x = _model_and_images()
    ref = model(x)
    q = ptq4vit.quantize(model, x, "rotq", 4, 4, adapters=ADAPTERS, weight_rounding="nearest", w_granularity="block",
                         bias_correction=False, **FAST)
    blocks = q.model.blocks
    assert all(isinstance(b.norm1, RMSNorm) and isinstance(b.mlp.norm, OnlineRotation) for b in blocks)
    assert isinstance(q.model.norm, RMSNorm)
    with q.quantization_disabled():  # the rotated float model computes the float function (float32 rounding)
        assert (q(x) - ref).abs().max() < 2e-6
    with pytest.raises(UnsupportedModelError, match="^model type PoolNet is not supported"):
        ptq4vit.transforms.apply_rotation(model, ptq4vit.transforms.RotationOptions(heads=True))


def test_reparameterization_folds_the_pairs_of_the_registered_adapter():
    model, x = _model_and_images()
    q = ptq4vit.quantize(model, x, "repq-vit", 4, 4, adapters=ADAPTERS, progress=False)
    qkv = q.model.blocks[0].attn.qkv
    # the folded per-channel ranges leave one per-tensor input quantizer on qkv, and norm1's affine changed
    assert qkv.a_quant.scale.numel() == 1
    assert not torch.equal(q.model.blocks[0].norm1.weight, model.blocks[0].norm1.weight)

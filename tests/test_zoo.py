"""Model names, local weights and evaluation transforms."""
import pytest
import torch
from PIL import Image

from ptq4vit.harness import zoo
from ptq4vit.errors import UserError

TINY = dict(img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=2, num_classes=10)


@pytest.mark.parametrize("name,timm_name", [
    ("ViT-S/224", "vit_small_patch16_224.augreg_in21k_ft_in1k"),
    ("vit-s/224/32", "vit_small_patch32_224.augreg_in21k_ft_in1k"),
    ("ViT_B_384", "vit_base_patch16_384.augreg_in21k_ft_in1k"),
    ("ViT-Ti/224", "vit_tiny_patch16_224.augreg_in21k_ft_in1k"),
    ("DeiT-Ti/224", "deit_tiny_patch16_224.fb_in1k"),
    ("DeiT-B/384", "deit_base_patch16_384.fb_in1k"),
    ("Swin-T/224", "swin_tiny_patch4_window7_224.ms_in1k"),
    ("swin-b/384", "swin_base_patch4_window12_384.ms_in22k_ft_in1k"),
    ("vit_s14_cifar10", "vit_small_patch14_dinov2"),
    ("deit_small_patch16_224.fb_in1k", "deit_small_patch16_224.fb_in1k"),
    ("vit_base_patch16_224.augreg_in21k_ft_in1k", "vit_base_patch16_224.augreg_in21k_ft_in1k"),
])
def test_resolve(name, timm_name):
    assert zoo.resolve(name).timm_name == timm_name


def test_paper_models_all_resolve():
    import timm
    names = zoo.paper_models()
    assert len(names) == 11
    for e in zoo.MODELS:
        if e.builder != "timm":  # built by its adapter (tests/test_families_*.py)
            continue
        arch, _, tag = e.timm_name.partition(".")
        assert timm.is_model(arch)
        if tag:
            assert timm.list_pretrained(e.timm_name), e.timm_name


def test_unknown_names():
    with pytest.raises(UserError, match="unknown model 'ViT-Q/224'"):
        zoo.resolve("ViT-Q/224")
    with pytest.raises(UserError, match="unknown pretrained tag 'nope'"):
        zoo.resolve("vit_small_patch16_224.nope")
    with pytest.raises(UserError, match="did you mean"):
        zoo.resolve("vit_smal_patch16_224")


def test_random_init_is_seeded_and_config_follows_img_size():
    a = zoo.create("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY, init_seed=1)
    b = zoo.create("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY, init_seed=1)
    assert a.weights == "random-init" and a.tag is None
    for (k, v), (_, w) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(v, w), k
    assert a.data_config["input_size"] == (3, 32, 32)
    x = a.transform()(Image.new("RGB", (50, 40)))
    assert x.shape == (3, 32, 32)


def test_paper_transform_resolution():
    lm = zoo.create("DeiT-S/224", pretrained=False, model_kwargs=dict(depth=1))
    cfg = lm.data_config
    assert cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.485, 0.456, 0.406)


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "wrapped"])
def test_local_weights_roundtrip(tmp_path, fmt):
    src = zoo.create("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY, init_seed=5).model
    sd = src.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "w.safetensors"
        save_file({k: v.half().contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "pth":
        path = tmp_path / "w.pth"
        torch.save(sd, path)
    else:
        path = tmp_path / "w.pth"
        torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, path)
    lm = zoo.create("vit_tiny_patch16_224", weights=path, model_kwargs=TINY)
    assert lm.weights == str(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tol = 1e-2 if fmt == "safetensors" else 0
        assert torch.allclose(lm.model(x), src(x), atol=tol, rtol=0)
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())


def test_weights_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        zoo.create("vit_tiny_patch16_224", weights=tmp_path / "none.safetensors", model_kwargs=TINY)
    bad = tmp_path / "bad.pth"
    torch.save({"head.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(UserError, match="does not fit model"):
        zoo.create("vit_tiny_patch16_224", weights=bad, model_kwargs=TINY)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read weights file"):
        zoo.create("vit_tiny_patch16_224", weights=junk, model_kwargs=TINY)
    with pytest.raises(UserError, match="has no hub weights"):
        zoo.create("vit_s14_cifar10")
    with pytest.raises(UserError, match="has no weights for"):
        zoo.create("vit_s14_cifar10", weights=tmp_path)


def test_real_cifar_model(shared_dir, cifar_dir):
    lm = zoo.create("vit_s14_cifar10", weights=shared_dir / "models")
    assert lm.num_classes == 10 and lm.weights.endswith("vit_small_patch14_dinov2_focus_cifar10.safetensors")
    tf = lm.transform()
    img = Image.open(next((cifar_dir / "test" / "cat").iterdir())).convert("RGB")
    x = tf(img)
    assert x.shape == (3, 224, 224)
    # resize 224 bicubic without crop, ImageNet mean/std
    from torchvision.transforms import functional as F
    ref = F.normalize(F.to_tensor(F.resize(img, [224, 224], interpolation=F.InterpolationMode.BICUBIC)),
                      [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert torch.allclose(x, ref, atol=1e-6)
    with torch.no_grad():
        assert lm.model(x[None]).shape == (1, 10)

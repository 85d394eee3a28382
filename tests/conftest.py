"""Shared fixtures: tiny random-init timm models and the location of ../shared."""
import os
from pathlib import Path

import pytest
import timm
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PTQ4VIT_SHARED", REPO.parent / "shared"))
#: CI sets PTQ4VIT_REQUIRE_SHARED=1 (.ci/run): tests that need ../shared then fail instead of skipping.
REQUIRE_SHARED = os.environ.get("PTQ4VIT_REQUIRE_SHARED", "") not in ("", "0")


def missing_shared(what: str) -> None:
    """Skip (or, where the shared data is required, fail) a test whose shared data is absent."""
    message = f"{what} is absent (set PTQ4VIT_SHARED)"
    if REQUIRE_SHARED:
        pytest.fail(f"{message}; PTQ4VIT_REQUIRE_SHARED is set, so this fails instead of skipping", pytrace=False)
    pytest.skip(message)

# Small configurations of each supported family: (timm name, create kwargs, image size).
TINY_MODELS = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, num_classes=10), 32),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, depth=2, num_classes=10), 32),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=56, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
                                                  num_classes=10), 56),
}


def make_tiny(kind: str, seed: int = 0):
    name, kwargs, size = TINY_MODELS[kind]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    images = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return model, images


def make_tiny_dinov2(depth: int):
    """A tiny DINOv2-style ViT (register token, LayerScale) and 4 images, as the low-bit tests use it."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", img_size=28, num_classes=10, pretrained=False, depth=depth,
                              embed_dim=96, num_heads=3, reg_tokens=1, init_values=0.3).eval()
    return model, torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request):
    return make_tiny(request.param)


@pytest.fixture
def shared_dir():
    if not SHARED.is_dir():
        missing_shared(f"shared data folder {SHARED}")
    return SHARED


# ---- data / CLI fixtures (ptq4vit.data, zoo, evaluate, results, cli tests)

#: A very small random-init ViT for command-line tests (fast to calibrate on CPU).
TINY_VIT_KWARGS = dict(img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=2, num_classes=10)
#: Preset overrides that make calibration of the tiny models take well under a second.
FAST_OVERRIDES = ["--set", "n_candidates=10", "--set", "rounds=1"]


@pytest.fixture
def cifar_dir(shared_dir):
    d = shared_dir / "data" / "cifar10"
    if not (d / "test").is_dir() or not (d / "calib").is_dir():
        missing_shared(f"{d} (test/ and calib/)")
    return d


@pytest.fixture
def imagenet_sample_dir(shared_dir):
    d = shared_dir / "data" / "imagenet-sample"
    if not (d / "val").is_dir():
        missing_shared(f"{d}/val")
    return d


@pytest.fixture
def tiny_cli_args(cifar_dir):
    """Common ``ptq4vit`` arguments: tiny random ViT, CIFAR-10 test (3 per class) and calib folders
    (add ``--model``/``--models`` and ``--calib-size``/``--calib-sizes``)."""
    import json as _json
    return ["--model-kwargs", _json.dumps(TINY_VIT_KWARGS), "--random-init",
            "--data", str(cifar_dir), "--val-split", "test", "--calib-dir", str(cifar_dir / "calib"),
            "--limit", "3", "--workers", "0", "--no-progress", *FAST_OVERRIDES]


def timm_unfused(model, images):
    """timm's own non-fused attention path on a copy of ``model``: the computation the quantized
    attention replacements follow (their reference for bit-identity with quantization off)."""
    import copy

    from timm.layers import set_fused_attn
    set_fused_attn(False)
    try:
        ref = copy.deepcopy(model)
        for m in ref.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        with torch.no_grad():
            return ref(images)
    finally:
        set_fused_attn(True)

"""Devices: quantizer buffers live where the model lives (``meta`` stands in for CUDA on CPU-only
machines); scales stay float32; a CUDA calibration matches the CPU one wherever a GPU is visible."""
import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import ptq4vit
from ptq4vit.models import insert_quant_sites
from ptq4vit.presets import get_preset
from ptq4vit.quant import Quantizer

from _fastq import fast_quantize

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def _vit():
    torch.manual_seed(0)
    return VisionTransformer(**VIT).eval()


def _images(n=3):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _quantizer_buffers(model):
    return [(f"{mn}.{bn}", b) for mn, m in model.named_modules() if isinstance(m, Quantizer)
            for bn, b in m.named_buffers(recurse=False)]


def test_sites_inserted_into_a_meta_model_get_meta_buffers():
    model = _vit().to("meta")  # (older timm cannot build a ViT under torch.device("meta"))
    # The default device is CPU: the buffers must follow the model, not the default.
    insert_quant_sites(model, get_preset("ptq4vit"), 8, 8)
    bufs = _quantizer_buffers(model)
    assert len(bufs) > 10
    assert all(b.device.type == "meta" for _, b in bufs), [n for n, b in bufs if b.device.type != "meta"]
    assert all(b.dtype == torch.float32 for _, b in bufs)


def test_quantizer_buffers_follow_the_model_to_meta_and_back():
    q = fast_quantize(_vit(), _images())
    bufs = _quantizer_buffers(q)
    assert len(bufs) > 10 and all(b.device.type == "cpu" for _, b in bufs)
    q.to("meta")
    assert all(b.device.type == "meta" for _, b in _quantizer_buffers(q))
    assert all(p.device.type == "meta" for p in q.parameters())
    q.to_empty(device="cpu")
    assert all(b.device.type == "cpu" for _, b in _quantizer_buffers(q))


def test_scales_stay_float32_when_the_model_changes_dtype():
    q = fast_quantize(_vit(), _images())
    before = {n: b.clone() for n, b in _quantizer_buffers(q)}
    q.to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in q.parameters())
    after = dict(_quantizer_buffers(q))
    assert all(after[n].dtype == torch.float32 and torch.equal(after[n], b) for n, b in before.items())
    q.half().float()
    assert all(torch.equal(dict(_quantizer_buffers(q))[n], b) for n, b in before.items())


FAST = dict(n_candidates=16, rounds=2, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_calibration_matches_cpu():
    model, images = _vit(), _images(4)
    cpu = ptq4vit.quantize(model, images, "ptq4vit", 8, 8, **FAST)
    gpu = ptq4vit.quantize(copy.deepcopy(model).cuda(), images, "ptq4vit", 8, 8, **FAST)
    assert all(b.device.type == "cuda" for _, b in _quantizer_buffers(gpu))
    for name, site in cpu.sites().items():
        for (bn, b_cpu), (_, b_gpu) in zip(site.named_buffers(), gpu.sites()[name].named_buffers()):
            torch.testing.assert_close(b_gpu.cpu(), b_cpu, rtol=1e-5, atol=0, msg=f"{name}.{bn}")
    with torch.no_grad():
        torch.testing.assert_close(gpu(images.cuda()).cpu(), cpu(images), rtol=1e-3, atol=1e-3)

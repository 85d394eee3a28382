"""The released PTQ4ViT code against ``official`` on the tiny reference run: which scales agree.

The tiny reference run is the pinned-scale test's tiny ViT (``tests/test_pinned_scales.py``: two
blocks, 48 features, 3 heads, random init, seed 0) calibrated at W6A6 on its six random 32x32
images (seed 3), 100 candidates, 3 rounds: 27 searched tensors (the patch embedding's per-channel
weight scales; per block the weight and input scales of qkv, proj, fc1 and fc2, both operands of
q@kᵀ, the softmax split and v; the head's weight and input scales).

The released code (https://github.com/hahnyuan/PTQ4ViT; pass its checkout as ``--released``)
runs unchanged on the CPU: its ``.cuda()`` calls return the tensor itself. Its configuration is
``configs/PTQ4ViT.py`` with the bit widths and the metric set as the released ablation script
(``example/test_ablation.py``) sets them, and it calibrates with ``HessianQuantCalibrator`` in
chunks of 4 images, as that script does. Beside it, ``official`` calibrates the same model on
the same images with the same metric. The script prints, per tensor, whether the two chose the
same scale, and the count; ``--write`` stores the released code's scales as JSON (the file
``tests/test_released_scales.py`` reads).

Usage:

    python benchmarks/ptq4vit_released.py --released ~/PTQ4ViT [--metric cosine] [--write tests/data/released_cosine_scales.json]
"""
from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import math
import platform
import sys
from pathlib import Path
from types import MethodType

import timm
import torch

import ptq4vit

W_BITS = A_BITS = 6
N_CANDIDATES = 100
N_IMAGES = 6


def tiny_reference_model() -> torch.nn.Module:
    """The pinned-scale test's tiny ViT (tests/test_pinned_scales.py)."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             embed_dim=48, num_heads=3, num_classes=10).eval()


def tiny_reference_images(n: int = N_IMAGES) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def run_on_cpu() -> None:
    """The released code moves every tensor with ``.cuda()``: on this CPU-only run it stays put."""
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.cuda.empty_cache = lambda: None


def released_config(src: Path, metric: str):
    """``configs/PTQ4ViT.py`` at W6A6 with ``metric``, set as the released ablation script sets it."""
    spec = importlib.util.spec_from_file_location("released_ptq4vit_config", src / "configs" / "PTQ4ViT.py")
    cfg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg)
    cfg.bit = (W_BITS, A_BITS)
    cfg.w_bit = {name: W_BITS for name in cfg.conv_fc_name_list}
    cfg.a_bit = {name: A_BITS for name in cfg.conv_fc_name_list}
    cfg.A_bit = {name: A_BITS for name in cfg.matmul_name_list}
    cfg.B_bit = {name: A_BITS for name in cfg.matmul_name_list}
    for kwargs in (cfg.ptqsl_conv2d_kwargs, cfg.ptqsl_linear_kwargs, cfg.ptqsl_matmul_kwargs):
        kwargs.update(metric=metric, eq_n=N_CANDIDATES, search_round=3, parallel_eq_n=1, init_layerwise=False)
    return cfg


class OneBatch:
    """The released calibrators read ``batch_size`` and iterate ``(images, targets)`` batches."""

    def __init__(self, images: torch.Tensor):
        self.images, self.batch_size = images, len(images)

    def __iter__(self):
        yield self.images, torch.zeros(len(self.images), dtype=torch.long)


def released_scales(src: Path, model: torch.nn.Module, images: torch.Tensor, metric: str) -> dict:
    """Calibrate ``model`` with the released code; its chosen scales in the qparams layout."""
    if not (src / "quant_layers" / "linear.py").is_file():
        raise SystemExit(f"--released {src}: expected a PTQ4ViT checkout (with quant_layers/linear.py)")
    run_on_cpu()
    sys.path.insert(0, str(src))
    models = importlib.import_module("utils.models")
    net_wrap = importlib.import_module("utils.net_wrap")
    quant_calib = importlib.import_module("utils.quant_calib")
    from timm.models.vision_transformer import Attention

    for module in model.modules():  # as the released get_net does, less its pretrained download
        if isinstance(module, Attention):
            module.matmul1, module.matmul2 = models.MatMul(), models.MatMul()
            released = MethodType(models.attention_forward, module)

            def forward(x, attn_mask=None, is_causal=False, _released=released):
                if attn_mask is not None or is_causal:
                    raise ValueError("the released attention forward takes no attention mask")
                return _released(x)
            module.forward = forward
    wrapped = net_wrap.wrap_modules_in_net(model, released_config(src, metric))
    calibrator = quant_calib.HessianQuantCalibrator(model, wrapped, OneBatch(images), sequential=False, batch_size=4)
    calibrator.batching_quant_calib()

    def floats(t) -> list:
        return [float(v) for v in torch.as_tensor(t).flatten()]
    out = {}
    for name, m in wrapped.items():
        if name.endswith("matmul2"):
            out[name] = {"split": float(m.split), "b_scale": floats(m.B_interval)}
        elif name.endswith("matmul1"):
            out[name] = {"a_scale": floats(m.A_interval), "b_scale": floats(m.B_interval)}
        elif isinstance(m, torch.nn.Conv2d):
            out[name] = {"w_scale": floats(m.w_interval)}
        else:
            out[name] = {"w_scale": floats(m.w_interval), "a_scale": floats(m.a_interval)}
    return out


def tensors(scales: dict) -> dict:
    """``{"<module>.<field>": [values]}`` for every searched tensor (a split is one value)."""
    flat = {}
    for name, fields in scales.items():
        for field, v in fields.items():
            if field in ("w_scale", "a_scale", "b_scale", "split"):
                flat[f"{name}.{field}"] = v if isinstance(v, list) else [v]
    return flat


def agreement(ours: dict, released: dict) -> list[tuple[str, bool]]:
    """Per tensor of the released run: whether ``official`` chose the same scales.

    Same means within 1e-6 relative: neighbouring candidates differ by ~1%, while Δ0 itself may
    differ by an ulp or two between the two codes' max-reductions.
    """
    got, want = tensors(ours), tensors(released)
    rows = []
    for key, values in want.items():
        same = key in got and len(got[key]) == len(values) and all(
            math.isclose(g, w, rel_tol=1e-6, abs_tol=0.0) for g, w in zip(got[key], values))
        rows.append((key, same))
    return rows


def ours_scales(model: torch.nn.Module, images: torch.Tensor, metric: str) -> dict:
    q = ptq4vit.quantize(model, images, "official", W_BITS, A_BITS, progress=False, metric=metric,
                         n_candidates=N_CANDIDATES)
    return {name: {k: v for k, v in fields.items() if k in ("w_scale", "a_scale", "b_scale", "split")}
            for name, fields in q.qparams()["modules"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--released", type=Path, required=True, help="a checkout of hahnyuan/PTQ4ViT")
    parser.add_argument("--metric", default="cosine", choices=["cosine", "mse", "hessian"])
    parser.add_argument("--images", type=int, default=N_IMAGES, help="calibration images (random, seed 3)")
    parser.add_argument("--write", type=Path, default=None, help="store the released code's scales here (JSON)")
    args = parser.parse_args()
    model, images = tiny_reference_model(), tiny_reference_images(args.images)
    ours = ours_scales(copy.deepcopy(model), images, args.metric)
    released = released_scales(args.released.expanduser(), model, images, args.metric)
    rows = agreement(ours, released)
    print(f"torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; metric {args.metric}, W{W_BITS}A{A_BITS}, {N_CANDIDATES} candidates")
    for key, same in rows:
        print(f"{'same' if same else 'DIFFERENT':9s} {key}")
    print(f"official chose the released code's scales on {sum(s for _, s in rows)} of {len(rows)} tensors")
    if args.write:
        record = {"metric": args.metric, "w_bits": W_BITS, "a_bits": A_BITS, "n_candidates": N_CANDIDATES,
                  "torch": torch.__version__, "modules": released}
        args.write.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()

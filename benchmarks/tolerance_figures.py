"""Print the figures that the tolerances of tests/test_quantize.py and tests/test_export.py are set from.

A tolerance in a test is the figure measured here times two to three; rerun this after a change
to the quantizers or the export and tighten (or justify) the bounds.

    python benchmarks/tolerance_figures.py            # both
    python benchmarks/tolerance_figures.py --only export
"""
import argparse
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))


def quantize_figures() -> None:
    import ptq4vit
    from conftest import make_tiny
    from test_quantize import FAST

    for kind in ("deit_distilled", "swin", "vit"):
        model, images = make_tiny(kind)
        for preset in ("base", "official", "ptq4vit"):
            q = ptq4vit.quantize(model, images, preset, 8, 8, **FAST)
            with torch.no_grad():
                ref, out = model(images), q(images)
            print(f"W8A8 {kind:15s} {preset:9s} relative logit error {((out - ref).norm() / ref.norm()).item():.4f}",
                  flush=True)


def export_figures() -> None:
    import test_export as T

    def show(tag, q, x):
        path = "/tmp/ptq4vit_tolerance_figures.onnx"
        T.export_onnx(q, path)
        c = T.compare_outputs(T.torch_out(q, x), T.run_onnx(path, x))
        print(f"ONNX {tag:22s} top-1 agreement {c['top1_agreement']:.1f}%  max |logit error| / max |logit| "
              f"{c['max_abs_logit_error'] / c['max_abs_logit']:.3g}", flush=True)

    _, q = T.quantized("vit")
    show("vit ptq4vit 8", q, torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(9)))
    for key, preset, bits in [("deit", "official", 8), ("swin", "ptq4vit", 8), ("vit", "base", 6), ("swin", "official", 6)]:
        _, q = T.quantized(key, preset, bits)
        show(f"{key} {preset} {bits}", q, torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    _, q = T.quantized("vit")
    q.model.blocks[0].mlp.fc2.a_quant.enabled = False
    show("vit, fc2 input float", q, torch.randn(4, 3, 32, 32))

    # Where the error comes from: per image, float rounding (~1e-7) or a code flipped at a boundary.
    x = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    for key, preset, bits in [("vit", "ptq4vit", 8), ("vit", "base", 6)]:
        _, q = T.quantized(key, preset, bits)
        path = "/tmp/ptq4vit_tolerance_figures.onnx"
        T.export_onnx(q, path)
        err = (torch.from_numpy(T.torch_out(q, x)) - torch.from_numpy(T.run_onnx(path, x))).abs().amax(1)
        print(f"ONNX {key} {preset} {bits}: {int((err > 1e-5).sum())} of {len(x)} images differ by more than 1e-5 "
              f"(a flipped code); median max |logit error| {err.median().item():.2g}", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["quantize", "export"])
    args = p.parse_args()
    if args.only != "export":
        quantize_figures()
    if args.only != "quantize":
        export_figures()

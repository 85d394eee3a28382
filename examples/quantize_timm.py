"""Quantize a timm model with the Python API, save it, load it back, and compare it with the float model.

    python examples/quantize_timm.py --model deit_tiny_patch16_224 --pretrained --images /data/imagenet/val
    python examples/quantize_timm.py --model vit_tiny_patch16_224 --img-size 64     # offline: random init, noise images

Only the library (``import ptq4vit``) and timm are used; the experiment harness and the
``ptq4vit`` command line do the same with datasets, result files and reports.
"""
import argparse
import tempfile
from pathlib import Path

import timm
import torch
from PIL import Image

import ptq4vit


def load_images(folder: str, transform, n: int) -> torch.Tensor:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
    if not files:
        raise SystemExit(f"no .jpg/.jpeg/.png images under {folder}")
    return torch.stack([transform(Image.open(f).convert("RGB")) for f in files])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--pretrained", action="store_true", help="download timm's weights (needs the model hub)")
    ap.add_argument("--img-size", type=int, default=None, help="build the model for this input size")
    ap.add_argument("--images", help="folder of images (calibration = the first 32, evaluation = the next 64)")
    ap.add_argument("--preset", default="ptq4vit", choices=list(ptq4vit.PRESETS))
    ap.add_argument("--bits", type=int, default=8, help="weight and activation bits (2..8)")
    ap.add_argument("--candidates", type=int, default=100, help="search grid size (fewer is faster)")
    args = ap.parse_args()

    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs).eval()
    cfg = timm.data.resolve_model_data_config(model)
    if args.img_size:
        cfg["input_size"] = (3, args.img_size, args.img_size)
    if args.images:
        images = load_images(args.images, timm.data.create_transform(**cfg), 96)
    else:
        images = torch.randn(96, *cfg["input_size"], generator=torch.Generator().manual_seed(0))
    calib, test = images[:32], images[32:]

    qmodel = ptq4vit.quantize(model, calib, args.preset, args.bits, args.bits, n_candidates=args.candidates)
    with torch.no_grad():
        quant_logits = qmodel(test)
        with qmodel.quantization_disabled():
            float_logits = qmodel(test)
    agreement = (quant_logits.argmax(1) == float_logits.argmax(1)).float().mean().item()
    print(f"{args.model} {args.preset} W{args.bits}A{args.bits}: top-1 agreement with float on {len(test)} images "
          f"{100 * agreement:.1f}%")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        ptq4vit.save(qmodel, path)
        reloaded = ptq4vit.load(path)
        with torch.no_grad():
            same = torch.equal(reloaded(test), quant_logits)
        print(f"saved {path.stat().st_size / 2 ** 20:.1f} MiB; reloaded outputs bit-identical: {same}")


if __name__ == "__main__":
    main()

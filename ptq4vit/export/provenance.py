"""What an exported ONNX file was exported from, recorded in it and checked against a model.

:func:`model_digest` identifies a quantized model by what its graph computes: the preset, the
bits, and every tensor of its state dict, with each quantized weight taken as its integer codes
(the checkpoint stores codes and :func:`ptq4vit.load` dequantizes them, so a model and its saved
and reloaded copy have one digest). :func:`export_onnx` writes it (and the input size) into the
file's metadata; :func:`check_exported_from` compares a file with a model before it is run. The
float32 graph of a plain float model records the digest of its float weights instead
(:func:`ptq4vit.checkpoint.float_weights_digest`): it belongs to every quantized model made from them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Optional

import torch

from ..errors import UserError
from ..quantized import QuantizedModel
from .input_size import size_text

__all__ = ["MODEL_DIGEST_KEY", "INPUT_SIZE_KEY", "FLOAT_WEIGHTS_KEY", "model_digest", "provenance_metadata",
           "float_provenance_metadata", "read_onnx_metadata", "onnx_input_size", "check_exported_from"]

MODEL_DIGEST_KEY = "ptq4vit.model_sha256"
INPUT_SIZE_KEY = "ptq4vit.input_size"
FLOAT_WEIGHTS_KEY = "ptq4vit.float_weights_sha256"


def _update(h: "hashlib._Hash", name: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{name}\0{t.dtype}{list(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_digest(qmodel: QuantizedModel) -> str:
    """sha256 of what ``qmodel`` computes: preset, bits, and its tensors with quantized weights as codes."""
    h = hashlib.sha256()
    h.update(json.dumps({"preset": dataclasses.asdict(qmodel.preset), "w_bits": qmodel.w_bits,
                         "a_bits": qmodel.a_bits}, sort_keys=True, default=str).encode())
    codes = {f"{n}.weight": m for n, m in qmodel.sites().items() if "w_quant" in m.quantizers()}
    for name, t in sorted(qmodel.model.state_dict().items()):
        site = codes.get(name)
        _update(h, name, site.w_quant.codes(site.weight.detach()).to(torch.int8) if site is not None else t)
    return h.hexdigest()


def provenance_metadata(qmodel: QuantizedModel, input_size: tuple) -> dict:
    """The metadata entries :func:`check_exported_from` reads."""
    return {MODEL_DIGEST_KEY: model_digest(qmodel), INPUT_SIZE_KEY: size_text(input_size),
            FLOAT_WEIGHTS_KEY: qmodel.float_weights_sha256 or "unknown"}


def float_provenance_metadata(model: torch.nn.Module, input_size: tuple) -> dict:
    """What the float32 graph of a plain float model records: the digest of its float weights and the input size."""
    from ..checkpoint import float_weights_digest
    from ..quantized import model_name
    return {"ptq4vit.model": model_name(model), FLOAT_WEIGHTS_KEY: float_weights_digest(model),
            INPUT_SIZE_KEY: size_text(input_size)}


def read_onnx_metadata(path: "str | os.PathLike") -> dict:
    """The metadata of an ONNX file (without loading its weights); UserError if it is not one."""
    try:
        import onnx
    except ImportError as e:
        raise UserError(f"reading an ONNX file's metadata needs the onnx package (pip install 'ptq4vit[export]'): {e}") from None
    path = os.fspath(path)
    try:
        model = onnx.load(path, load_external_data=False)
    except FileNotFoundError:
        raise UserError(f"ONNX file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"ONNX file {path} is a folder, not a file") from None
    except Exception as e:  # protobuf decode errors come in several types
        raise UserError(f"{path} is not a readable ONNX file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'cannot parse it'})") from None
    return {p.key: p.value for p in model.metadata_props}


def onnx_input_size(meta: dict) -> Optional[tuple]:
    text = meta.get(INPUT_SIZE_KEY)
    return tuple(int(v) for v in text.split("x")) if text else None


def check_exported_from(path: "str | os.PathLike", qmodel: QuantizedModel, what: str = "the model",
                        input_size: Optional[tuple] = None) -> dict:
    """Refuse (UserError naming both) an ONNX file not exported from ``qmodel``, or exported at another
    ``input_size`` than the images it is to run on; return the file's metadata."""
    path = os.fspath(path)
    meta = read_onnx_metadata(path)
    recorded = meta.get(MODEL_DIGEST_KEY)
    if recorded is None and meta.get("ptq4vit.int8") == "0" and FLOAT_WEIGHTS_KEY in meta:
        # the float32 graph of a plain float model: it must be the one ``qmodel`` was quantized from
        theirs, ours = meta[FLOAT_WEIGHTS_KEY], qmodel.float_weights_sha256
        if ours is None:
            raise UserError(f"{path} is the float32 graph of a float model, and {what} does not record the float "
                            f"weights it was quantized from: export the float32 graph from {what} instead")
        if theirs != ours:
            raise UserError(f"{path} is the float32 graph of other float weights (sha256 {theirs[:16]}...) than "
                            f"{what} was quantized from ({ours[:16]}...): export it again from that float model")
    elif recorded is None:
        raise UserError(f"{path} does not record which model it was exported from (exported by another tool or an "
                        f"older ptq4vit): export it again from {what} with ptq4vit export")
    elif recorded != (ours := model_digest(qmodel)):
        def describe(m):
            bits = f" W{m['ptq4vit.w_bits']}A{m['ptq4vit.a_bits']}" if "ptq4vit.w_bits" in m else ""
            return f"{m.get('ptq4vit.model', '?')} {m.get('ptq4vit.preset', '')}{bits}".replace("  ", " ").strip()
        theirs = describe(meta)
        mine = f"{qmodel.name} {qmodel.preset.name} W{qmodel.w_bits}A{qmodel.a_bits}"
        raise UserError(f"{path} was exported from another model ({theirs}, model digest {recorded[:16]}...) than "
                        f"{what} ({mine}, model digest {ours[:16]}...): export it again from {what}")
    size = onnx_input_size(meta)
    if input_size is not None and size is not None and tuple(size) != tuple(input_size):
        raise UserError(f"{path} takes {size_text(size)} images; the images here are {size_text(input_size)}")
    return meta

"""What the family tests (tests/test_families_*.py, tests/test_rotation.py) do alike: tiny models moved off
their initial values, calibration at W8A8 and W4A4, the rotation and the checkpoint round trips, and running
the integer export on ONNX Runtime and OpenVINO. Each test keeps its own expected values; these only run
the steps and assert what every family asserts the same way."""
import copy

import numpy as np
import pytest
import torch

import ptq4vit
from ptq4vit import CheckpointError, UnsupportedModelError
from ptq4vit.export.cpu import u8s8_saturates
from ptq4vit.models import insert_quant_sites
from ptq4vit.presets import get_preset
from ptq4vit.quantized import QuantizedModel
from ptq4vit.transforms import apply_rotation

#: the scale search cut to a few candidates and one round: the family tests check structure, not accuracy
FAST = dict(progress=False, n_candidates=4, rounds=1)


def call(model, x):
    """The model's output as it is (the default where a family's output needs no picking out)."""
    return model(x)


def random_images(n: int, seed: int = 1, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def logits_or_pooled(model, x):
    """A Hugging Face model's logits, or a backbone's pooled features where it has no classifier."""
    out = model(x)
    return out.logits if hasattr(out, "logits") else out.pooler_output


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| relative to max |ref|."""
    return float((a - ref).abs().max() / ref.abs().max())


def max_abs(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max())


def move_off_init(model, scale: float, names=(), vectors: bool = False, generator=None):
    """Adds ``scale`` times standard normal noise (from ``generator``, else torch's global one) to each parameter
    whose name contains one of ``names`` and, with ``vectors``, to each of at most one dimension; in place.

    The libraries initialise biases, norm affines, LayerScales, tokens and position tables to constants
    (often zero), which would hide a bias or a fold left out."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (vectors and p.dim() <= 1) or any(n in name for n in names):
                p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model


def unquantized(model, name: str) -> QuantizedModel:
    """A copy of ``model`` with the ptq4vit preset's W8A8 sites in place and quantization switched off."""
    m = copy.deepcopy(model)
    insert_quant_sites(m, get_preset("ptq4vit"), 8, 8)
    q = QuantizedModel(m, get_preset("ptq4vit"), 8, 8, name)
    q.set_quantization(False)
    return q


def rotation_error(model, x, opts, output=call) -> torch.Tensor:
    """max |rotated - float| on ``x`` of a copy of ``model`` rotated with ``opts``."""
    with torch.no_grad():
        ref = output(model, x)
        return (output(apply_rotation(copy.deepcopy(model), opts), x) - ref).abs().max()


def calibrate_at_w8a8_and_w4a4(model, x, preset, error, output=call, same_shape=False, **overrides):
    """Quantizes ``model`` with ``preset`` at W8A8 and at W4A4 and asserts each output finite (and, with
    ``same_shape``, of the float output's shape). Returns ``{bits: (quantized model, its output)}`` and
    ``{bits: error(output, float output)}``."""
    with torch.no_grad():
        ref = output(model, x)
    runs, errors = {}, {}
    for bits in (8, 4):
        q = ptq4vit.quantize(model, x, preset, bits, bits, **FAST, **overrides)
        with torch.no_grad():
            out = q(x)
        if same_shape:
            assert out.shape == ref.shape and torch.isfinite(out).all()
        else:
            assert torch.isfinite(out).all()
        runs[bits], errors[bits] = (q, out), error(out, ref)
    return runs, errors


def switched_off(model, x, preset="base", bits=8, output=call, **overrides):
    """``model`` quantized with ``preset`` at W``bits``A``bits``, its output on ``x`` with quantization switched off
    and the float model's output."""
    with torch.no_grad():
        ref = output(model, x)
    q = ptq4vit.quantize(model, x, preset, bits, bits, **FAST, **overrides)
    with torch.no_grad(), q.quantization_disabled():
        return q, q(x), ref


def rotq_switched_off(model, x, output=call):
    """:func:`switched_off` for rotq at W4A4 with nearest rounding and no bias correction (corrected biases change
    the float function)."""
    return switched_off(model, x, "rotq", 4, output, weight_rounding="nearest", bias_correction=False)


def assert_refused_untouched(model, change, match, error=UnsupportedModelError):
    """``change(model)`` raises ``error`` matching ``match`` and leaves every tensor of the model as it was."""
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        change(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def assert_checkpoint_round_trip(q, model, x, directory, want=None) -> dict:
    """Saves ``q``; the checkpoint loaded on its own and loaded onto ``model`` computes ``want`` (``q(x)`` when
    not given) bit for bit. Returns the checkpoint's metadata."""
    path = directory / "q.safetensors"
    meta = ptq4vit.save(q, path)
    with torch.no_grad():
        want = q(x) if want is None else want
        assert torch.equal(ptq4vit.load(path)(x), want)
        assert torch.equal(ptq4vit.load(path, model)(x), want)
    return meta


def assert_crafted_torchvision_checkpoint_refused(q, directory, monkeypatch, key, value, words):
    """A checkpoint of ``q`` whose create_kwargs gain ``key=value`` is refused (``words``) before torchvision
    builds anything."""
    import torchvision.models

    from test_checkpoint_checks import rewrite
    ptq4vit.save(q, directory / "q.safetensors")
    built = []
    monkeypatch.setattr(torchvision.models, "get_model", lambda *a, **k: built.append(a))
    bad = rewrite(directory / "q.safetensors", directory / "bad.safetensors",
                  meta_edit=lambda meta: meta["model"]["create_kwargs"].update({key: value}))
    with pytest.raises(CheckpointError, match=words):
        ptq4vit.load(bad)
    assert built == []


def assert_only_architecture_keys_saved(q, directory, keys, value):
    """Saving ``q`` with any of ``keys`` (set to ``value``) in its create_kwargs is refused by name, and nothing is
    written."""
    for key in keys:
        with pytest.raises(CheckpointError, match=f"^create_kwargs: argument '{key}' is not an architecture argument"):
            ptq4vit.save(q, directory / "q.safetensors", create_kwargs={key: value})
    assert not (directory / "q.safetensors").exists()


def run_on_onnx_runtime(q, x, directory, **export_kw):
    """Exports ``q`` in both integer formats (contrib, QDQ) to ``directory/<format>.onnx`` and runs each on ONNX
    Runtime: yields ``(format, export report, output)``."""
    pytest.importorskip("onnxruntime")
    from ptq4vit.export import export_onnx
    from ptq4vit.export.ort import make_session

    for fmt in ("contrib", "qdq"):
        path = directory / f"{fmt}.onnx"
        rep = export_onnx(q, path, format=fmt, **export_kw)
        yield fmt, rep, make_session(str(path)).run(None, {"input": x.numpy()})[0]


#: Whether OpenVINO computes this CPU's int8 products exactly: on x86 without VNNI its u8 x s8 kernels saturate
#: (tests/test_openvino.py::test_openvino_is_exact_on_a_saturating_product_only_with_vnni), so outputs
#: are compared with the torch model's only where it has VNNI; the integer layers are counted everywhere.
OPENVINO_INT8_EXACT = not u8s8_saturates()


def run_on_openvino(path, x):
    """Compiles the ONNX graph at ``path`` for OpenVINO's CPU plugin (f32, one thread): its output on ``x`` and
    how many of the layers it executes run in an integer precision."""
    from ptq4vit.export.openvino import INTEGER_PRECISIONS, compile_onnx, executed_layers

    compiled = compile_onnx(path, "f32", threads=1)
    integer = [layer for layer in executed_layers(compiled) if layer[1] in INTEGER_PRECISIONS]
    return compiled.run(x.numpy()), len(integer)


def integer_products(rep) -> int:
    """The integer products of an exported graph: one per integer site, two for a twin one."""
    return sum(2 if "twin" in s.lowering else 1 for s in rep.sites if s.integer)


def within(out: np.ndarray, ref: np.ndarray, fraction: float) -> bool:
    """max |out - ref| at most ``fraction`` of max |ref| (integer products, float norms and softmax in another
    op order: a code next to a rounding boundary may flip)."""
    return bool(np.abs(out - ref).max() <= fraction * np.abs(ref).max())

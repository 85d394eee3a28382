"""A quantizer kind defined outside the library, in this one file, plus one registration (its integer
lowering): calibration, memory plan, qparams, checkpoint and export all work with it through the
quantizer interface, none of them edited for it."""
from typing import Optional

import pytest
import torch

import ptq4vit
from ptq4vit import checkpoint as ck
from ptq4vit.models.sites import SiteBuilder
from ptq4vit.quant import MIN_SCALE, Quantizer, ScaleSearch, compute_dtype, qmax

from conftest import make_tiny_dinov2


def unsigned_codes(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.round(x.to(compute_dtype(x)) / scale).clamp_(0, (1 << bits) - 1)


def unsigned_fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return unsigned_codes(x, scale, bits).mul_(scale).to(x.dtype)


class UnsignedQuantizer(Quantizer):
    """Unsigned uniform codes ``clamp(round(x/Δ), 0, 2^b - 1)``: a mostly non-negative operand (GELU's
    output) on all ``2^b`` codes, its small negative values clipped to zero."""

    def __init__(self, bits: int, device: Optional[torch.device] = None):
        super().__init__(bits)
        self.register_buffer("scale", torch.ones(1, dtype=torch.float32, device=device))

    def set_scale(self, scale: torch.Tensor) -> None:
        self.scale.copy_(scale.reshape(1))
        self.calibrated = True

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return unsigned_codes(x, self.scale, self.bits)

    def dequantize(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return codes.to(torch.float32).mul_(self.scale).to(dtype)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return unsigned_fake_quant(x, self.scale, self.bits)

    def scale_search(self, x: torch.Tensor) -> ScaleSearch:
        bits = self.bits
        return ScaleSearch(lambda t, s: unsigned_fake_quant(t, s, bits), self.set_scale,
                           start=(x.max() / ((1 << bits) - 0.5)).clamp_min(MIN_SCALE).reshape(1))


def register_lowering() -> None:
    """The one registration: its codes are a linear input's ``clamp(round(x/Δ) + z, -q, q-1)`` with ``z = -q``."""
    from ptq4vit.export.lowering import LINEAR_INPUTS, LinearInput

    if LINEAR_INPUTS.find(UnsignedQuantizer(8)) is None:
        LINEAR_INPUTS.register(UnsignedQuantizer, lambda q: LinearInput(q.bits, float(q.scale[0]), -qmax(q.bits)))


@pytest.fixture
def unsigned_fc2(monkeypatch):
    """fc2's input quantized by the new kind (which quantizer a site gets is the preset's choice, not the kind's)."""
    def post_gelu_linear(self, linear):
        return self.linear(linear, a_quant=UnsignedQuantizer(self.a_bits, device=linear.weight.device))
    monkeypatch.setattr(SiteBuilder, "post_gelu_linear", post_gelu_linear)


def test_a_kind_from_its_own_file_calibrates_reports_and_round_trips(unsigned_fc2, tmp_path):
    m, x = make_tiny_dinov2(depth=2)
    q = ptq4vit.quantize(m, x, "ptq4vit", 4, 4, progress=False, n_candidates=6, rounds=2, memory_budget=64 << 20)
    fc2 = q.model.blocks[1].mlp.fc2
    assert type(fc2.a_quant) is UnsignedQuantizer and fc2.a_quant.calibrated
    assert q.qparams()["modules"]["blocks.1.mlp.fc2"]["a_scale"] == [float(fc2.a_quant.scale)]
    assert ck.structure(q)["sites"]["blocks.1.mlp.fc2"]["a_quant"] == {"type": "UnsignedQuantizer", "bits": 4}
    ck.save(q, tmp_path / "q.safetensors")
    q2 = ptq4vit.load(tmp_path / "q.safetensors")
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))


def test_its_lowering_is_one_registration(unsigned_fc2, tmp_path):
    pytest.importorskip("onnxruntime")
    from ptq4vit.export import export_onnx
    from ptq4vit.export.lowering import LINEAR_INPUTS
    from ptq4vit.export.ort import make_session

    m, x = make_tiny_dinov2(depth=1)
    q = ptq4vit.quantize(m, x, "ptq4vit", 8, 8, progress=False, n_candidates=6, rounds=1)
    if LINEAR_INPUTS.find(q.model.blocks[0].mlp.fc2.a_quant) is None:   # (before: a float fallback, by name)
        rep = export_onnx(q, tmp_path / "float.onnx", format="qdq")
        assert [s.reason for s in rep.fallbacks if s.name == "blocks.0.mlp.fc2"] == [
            "no integer lowering for input quantizer UnsignedQuantizer"]
    register_lowering()
    for fmt in ("contrib", "qdq"):
        rep = export_onnx(q, tmp_path / f"{fmt}.onnx", format=fmt)
        assert [s.name for s in rep.fallbacks] == ["patch_embed.proj"]
        got = make_session(str(tmp_path / f"{fmt}.onnx")).run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            want = q(x).numpy()
        assert abs(got - want).max() <= 1e-4 * abs(want).max(), fmt

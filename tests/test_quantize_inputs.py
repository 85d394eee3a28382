"""``quantize`` refuses bad input by name before calibrating, and never returns a scale that is not
finite and positive."""
import logging
import math

import pytest
import timm
import torch
from conftest import TINY_MODELS, make_tiny
from torch import nn

import ptq4vit
from ptq4vit import UserError
from ptq4vit.finite import bad_scale_problem, bad_scales, nonfinite_count
from ptq4vit.nn import QuantLinear
from ptq4vit.presets import PRESETS
from ptq4vit.quant import AsymmetricQuantizer, TwinSoftmaxQuantizer, UniformQuantizer

FAST = dict(n_candidates=4, rounds=1)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_non_finite_images_are_refused_before_calibration_for_every_preset(preset):
    model, images = make_tiny("vit")
    images[0, 0, 0, 0] = math.nan
    images[3, 2, 5, 7] = -math.inf
    with pytest.raises(UserError) as e:
        ptq4vit.quantize(model, images, preset, progress=False)
    assert str(e.value) == f"calib_images hold 2 of {images.numel()} values that are not finite (NaN or inf)"


def test_non_finite_model_weights_are_refused_by_name():
    model, images = make_tiny("vit")
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[2, :3] = math.nan
    with pytest.raises(UserError) as e:
        ptq4vit.quantize(model, images, "fast8", progress=False)
    n = model.blocks[1].mlp.fc1.weight.numel()
    assert str(e.value) == (f"the float model's parameter blocks.1.mlp.fc1.weight has 3 of {n} values that are not "
                            f"finite (NaN or inf)")


@pytest.mark.parametrize("preset", ["base", "ptq4vit", "deploy8"])
def test_a_float_model_that_overflows_on_finite_images_is_named_at_its_first_site(preset):
    """Finite images the float model overflows on: before, NaN scales were stored (base, deploy8) or a
    raw ValueError came from the search (ptq4vit)."""
    model, images = make_tiny("vit")
    with pytest.raises(UserError, match=r"^the float model's input at site 'blocks\.0\.attn\.qkv' has \d+ of \d+ "
                                        r"values that are not finite \(NaN or inf\) on the calibration images"):
        ptq4vit.quantize(model, images * 1e37, preset, progress=False, **FAST)


@pytest.mark.parametrize("calibrator, preset", [("calibrate_model", "fast8"), ("calibrate_percentile", "repq-vit")])
def test_a_scale_calibration_leaves_not_finite_or_positive_is_refused(calibrator, preset, monkeypatch):
    """Whatever calibration writes is checked once at the end, for both kinds of calibration."""
    import ptq4vit.api as api
    real = getattr(api, calibrator)

    def broken(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        model.blocks[1].attn.proj.a_quant.scale.fill_(0.0)
        return out
    monkeypatch.setattr(api, calibrator, broken)
    model, images = make_tiny("vit")
    with pytest.raises(UserError) as e:
        ptq4vit.quantize(model, images, preset, progress=False, **(FAST if preset == "fast8" else {}))
    assert str(e.value).startswith("calibration gave 1 quantizer buffer(s) that are not finite and positive, "
                                   "first blocks.1.attn.proj.a_quant.scale (0.0): ")


def test_bad_scales_on_hand_made_quantizers():
    q = UniformQuantizer(8, 3, axis=0)
    q.set_scale(torch.tensor([0.5, math.nan, -1.0]))
    assert [(n, math.isnan(v)) for n, v in bad_scales(q)] == [("scale", True)]
    asym = AsymmetricQuantizer(8, 2, axis=0)
    asym.set_params(torch.tensor([0.1, 0.2]), torch.tensor([-3.0, 4.0]))  # a negative zero point is fine
    assert bad_scales(asym) == []
    asym.set_params(torch.tensor([0.1, 0.2]), torch.tensor([0.0, math.inf]))
    assert bad_scales(asym) == [("zero_point", math.inf)]
    split = TwinSoftmaxQuantizer(8)
    split.set_split(torch.tensor(-0.25))
    lin = QuantLinear(nn.Linear(4, 2), UniformQuantizer(8), UniformQuantizer(8), smooth=True)
    with torch.no_grad():
        lin.smooth[2] = 0.0
    model = nn.ModuleDict({"split": split, "lin": lin})
    assert bad_scales(model) == [("split.split", -0.25), ("lin.smooth", 0.0)]


class _StepQuantizer(nn.Module):
    """A quantizer kind of its own: its step is checked because it declares it, not by its name."""

    positive_buffers = ("step",)

    def __init__(self, step):
        super().__init__()
        self.register_buffer("step", torch.tensor(step))
        self.register_buffer("offset", torch.zeros(len(step)))


def test_bad_scale_problem_names_the_first_bad_buffer_and_counts_its_values():
    q = UniformQuantizer(8, 3, axis=0)
    q.set_scale(torch.tensor([0.5, math.nan, -1.0]))
    assert bad_scale_problem(q) == "scale has 1 of 3 values that are not finite (NaN or inf)"
    q.set_scale(torch.tensor([0.5, 0.0, -1.0]))
    assert bad_scale_problem(q) == "scale has 2 of 3 values that are not > 0 (a step must be positive)"
    q.set_scale(torch.tensor([0.5, 1.0, 2.0]))
    assert bad_scale_problem(q) is None
    own = nn.ModuleDict({"a": _StepQuantizer([1.0, 2.0]), "b": _StepQuantizer([1.0, -2.0, 0.0, 3.0])})
    assert bad_scale_problem(own) == "b.step has 2 of 4 values that are not > 0 (a step must be positive)"
    own.b.step.fill_(1.0)
    own.b.offset[1] = -math.inf
    assert bad_scale_problem(own) == "b.offset has 1 of 4 values that are not finite (NaN or inf)"


def test_nonfinite_count_counts_nan_and_both_infinities():
    t = torch.tensor([[1.0, math.nan], [math.inf, -math.inf]], dtype=torch.bfloat16)
    assert nonfinite_count(t) == 3 and nonfinite_count(torch.ones(5)) == 0 and nonfinite_count(torch.ones(0)) == 0


@pytest.mark.parametrize("kind, size, expected", [
    ("vit", 48, "calib_images are 48x48 but the model takes 32x32 images (build it with dynamic_img_size=True "
                "to take other sizes)"),
    ("swin", 64, "calib_images are 64x64 but the model takes 56x56 images (build it with dynamic_img_size=True "
                 "to take other sizes)"),
])
def test_images_of_another_size_are_refused_naming_both_sizes(kind, size, expected):
    model, _ = make_tiny(kind)
    with pytest.raises(UserError) as e:
        ptq4vit.quantize(model, torch.randn(2, 3, size, size), "fast8", progress=False)
    assert str(e.value) == expected


@pytest.mark.parametrize("kind, good, bad, patch", [("vit", 40, 36, 8), ("swin", 60, 58, 4)])
def test_dynamic_img_size_models_take_multiples_of_their_patch(kind, good, bad, patch):
    name, kwargs, size = TINY_MODELS[kind]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, dynamic_img_size=True, **kwargs).eval()
    images = torch.randn(2, 3, good, good, generator=torch.Generator().manual_seed(1))
    q = ptq4vit.quantize(model, images, "fast8", progress=False, **FAST)
    with torch.no_grad():
        assert torch.isfinite(q(images)).all()
    with pytest.raises(UserError) as e:
        ptq4vit.quantize(model, torch.randn(2, 3, bad, bad), "fast8", progress=False)
    assert str(e.value) == (f"calib_images are {bad}x{bad} but the model (built for {size}x{size}, dynamic_img_size) "
                            f"takes sizes that are multiples of its {patch}x{patch} patches")


@pytest.mark.parametrize("kwargs, message", [
    (dict(memory_budget=3e6), "memory_budget must be an int or None, got 3000000.0 (float)"),
    (dict(memory_budget="2G"), "memory_budget must be an int or None, got '2G' (str)"),
    (dict(memory_budget=True), "memory_budget must be an int or None, got True (bool)"),
    (dict(memory_budget=0), "memory_budget must be a positive number of bytes, got 0"),
    (dict(capture_batch="8"), "capture_batch must be an int, got '8' (str)"),
    (dict(capture_batch=0), "capture_batch must be a positive integer, got 0"),
    (dict(threads=2.0), "threads must be an int or None, got 2.0 (float)"),
    (dict(progress="no"), "progress must be True or False, got 'no' (str)"),
    (dict(inplace=1), "inplace must be True or False, got 1 (int)"),
    (dict(w_bits=8.0), "w_bits must be an int, got 8.0 (float)"),
    (dict(a_bits="8"), "a_bits must be an int, got '8' (str)"),
    (dict(preset=3), "preset must be a string or a Recipe or a Preset, got 3 (int)"),
    (dict(calib_images=[[0.0]]), "calib_images must be a Tensor, got [[0.0]] (list)"),
    (dict(n_candidates="5"), "Preset field n_candidates must be an int, got '5' (str)"),
    (dict(rounds="3"), "Preset field rounds must be an int, got '3' (str)"),
])
def test_arguments_of_a_natural_but_wrong_type_give_one_line(kwargs, message):
    model, images = make_tiny("vit")
    args = dict(calib_images=images, preset="fast8", progress=False)
    args.update(kwargs)
    with pytest.raises(UserError) as e:
        ptq4vit.quantize(model, **args)
    assert str(e.value) == message


def test_a_model_that_is_not_a_module_is_named():
    with pytest.raises(UserError, match=r"^model must be a Module, got 'vit' \(str\)$"):
        ptq4vit.quantize("vit", torch.zeros(1, 3, 32, 32))


def test_a_small_calibration_set_is_not_reported_as_a_memory_limit(caplog):
    model, images = make_tiny("vit")
    with caplog.at_level(logging.DEBUG, logger="ptq4vit"):
        ptq4vit.quantize(model, images[:4], "fast8", progress=False, capture_batch=8, **FAST)
    messages = [r.getMessage() for r in caplog.records]
    assert not any("memory budget" in m for m in messages), messages
    assert "capture passes of 4 images: the calibration set holds no more (capture_batch=8)" in messages

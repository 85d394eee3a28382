"""Every quantizer kind answers the same questions: spec, qparams, codes, search memory, search space;
and per-kind handlers of other layers are found by registration."""
import pytest
import torch

from ptq4vit.quant import (AsymmetricQuantizer, GeluLogQuantizer, KindRegistry, LogQuantizer, Quantizer,
                           TwinGeluQuantizer, TwinSoftmaxQuantizer, UniformQuantizer, gelu_twin_neg_step)


def test_spec_is_the_kind_checkpoints_store():
    assert UniformQuantizer(6, 3, axis=0).spec() == {"type": "UniformQuantizer", "bits": 6, "groups": 3, "axis": 0}
    assert AsymmetricQuantizer(4).spec() == {"type": "AsymmetricQuantizer", "bits": 4, "groups": 1, "axis": None}
    assert TwinSoftmaxQuantizer(8, "sum").spec() == {"type": "TwinSoftmaxQuantizer", "bits": 8, "form": "sum"}
    assert TwinGeluQuantizer(8, pow2=True).spec() == {"type": "TwinGeluQuantizer", "bits": 8, "pow2": True}
    assert GeluLogQuantizer(4, "log_sqrt2").spec() == {"type": "GeluLogQuantizer", "bits": 4, "base": "log_sqrt2"}
    assert LogQuantizer(4, scaled=True).spec() == {"type": "LogQuantizer", "bits": 4, "scaled": True}
    assert LogQuantizer(4).spec() == {"type": "LogQuantizer", "bits": 4}
    # key order is part of the stored structure's messages: type and bits first
    assert list(UniformQuantizer(6, 3, axis=0).spec()) == ["type", "bits", "groups", "axis"]


def test_qparams_of_every_kind():
    u = UniformQuantizer(4, 2, axis=0)
    u.set_scale(torch.tensor([0.5, 0.25]))
    assert u.qparams("w") == {"w_scale": [0.5, 0.25]}
    a = AsymmetricQuantizer(4)
    a.set_params(torch.tensor([0.5]), torch.tensor([-3.0]))
    assert a.qparams("a") == {"a_scale": [0.5], "a_zero_point": [-3.0]}
    t = TwinSoftmaxQuantizer(4)
    t.set_split(torch.tensor(0.125))
    assert t.qparams("a") == {"split": 0.125}
    g = TwinGeluQuantizer(4)
    g.set_scale(torch.tensor([2.0]))
    assert g.qparams("a") == {"a_scale": [2.0], "a_neg_scale": float(torch.tensor(gelu_twin_neg_step(4)))}
    gl = GeluLogQuantizer(4, "log2")
    gl.set_scale(torch.tensor([2.0]))
    assert list(gl.qparams("a")) == ["a_scale", "a_neg_scale", "a_log"] and gl.qparams("a")["a_log"] == "log2"
    assert LogQuantizer(4, "log2").qparams("a") == {"a_log": "log2"}
    s = LogQuantizer(4, "log2", scaled=True)
    s.set_scale(torch.tensor(0.75))
    assert s.qparams("a") == {"a_log": "log2", "a_scale": [0.75]}


def test_search_memory_per_kind():
    assert [q.search_bytes(10) for q in (UniformQuantizer(4), AsymmetricQuantizer(4), TwinGeluQuantizer(4),
                                         GeluLogQuantizer(4), TwinSoftmaxQuantizer(4), LogQuantizer(4))] == [20, 20, 30, 40, 50, 20]
    assert [q.whole_operand_search for q in (UniformQuantizer(4, 2, axis=1), TwinSoftmaxQuantizer(4))] == [False, True]


def test_twin_kinds_have_no_single_tensor_of_codes():
    with pytest.raises(NotImplementedError, match="TwinGeluQuantizer has no single tensor of codes"):
        TwinGeluQuantizer(4).codes(torch.zeros(2))


def test_uniform_search_starts_at_each_groups_absmax():
    x = torch.tensor([[[[1.0, -7.0]], [[3.5, 0.0]]]])           # (images, heads=2, rows, cols)
    q = UniformQuantizer(4, 2, axis=1)
    space = q.scale_search(x)
    assert torch.equal(space.start, torch.tensor([7.0, 3.5]) / 7.5)   # max|x| / (qmax - 0.5)
    assert torch.equal(UniformQuantizer(4).scale_search(x).start, torch.tensor([7.0 / 7.5]))
    assert torch.equal(space.fake_quant(torch.tensor([0.3]), torch.tensor([0.25])), torch.tensor([0.25]))
    space.store(torch.tensor([0.5, 0.25]))
    assert q.calibrated and torch.equal(q.scale, torch.tensor([0.5, 0.25]))


def test_asymmetric_search_fixes_the_zero_point_from_the_range():
    q = AsymmetricQuantizer(4)
    space = q.scale_search(torch.tensor([-1.0, 2.0]))
    assert torch.equal(space.start, torch.tensor([0.2]))           # (2 - -1) / 15
    space.store(torch.tensor([0.25]))
    assert torch.equal(q.scale, torch.tensor([0.25])) and torch.equal(q.zero_point, torch.tensor([-3.0]))  # round(5) - 8
    with pytest.raises(NotImplementedError, match="per-group AsymmetricQuantizer"):
        AsymmetricQuantizer(4, 2, axis=0).scale_search(torch.zeros(2, 2))


def test_post_gelu_searches_start_and_restrict():
    x = torch.tensor([-0.1, 0.3, 3.0])
    assert torch.equal(TwinGeluQuantizer(4).scale_search(x).start, torch.tensor([3.0 / 7.5]))
    assert TwinGeluQuantizer(4).scale_search(x).restrict is None
    neg = torch.tensor(gelu_twin_neg_step(4))
    restricted = TwinGeluQuantizer(4, pow2=True).scale_search(x).restrict(torch.tensor([0.1, 0.2, 0.5]))
    assert torch.equal(restricted, neg * torch.tensor([8.0, 16.0]))  # 2^m Δ- inside [0.1, 0.5] (Δ- = 0.0212)
    assert torch.equal(GeluLogQuantizer(4).scale_search(x).start, torch.tensor([3.0]))  # Δ: the largest level


def test_softmax_twin_searches_fixed_splits_and_log_searches_nothing():
    space = TwinSoftmaxQuantizer(4).scale_search(torch.rand(2, 2))
    assert space.start is None and torch.equal(space.fixed[:3, 0], torch.tensor([1.0, 0.5, 0.25]))
    assert space.fixed.shape == (20, 1)
    assert LogQuantizer(4).scale_search(torch.rand(2, 2)) is None


def test_registry_finds_a_kind_or_its_nearest_base_and_names_what_is_missing():
    reg = KindRegistry("input quantizer")
    reg.register(UniformQuantizer, "uniform")

    class MyUniform(UniformQuantizer):
        pass

    assert reg.get(UniformQuantizer(4)) == "uniform" and reg.get(MyUniform(4)) == "uniform"
    assert reg.find(AsymmetricQuantizer(4)) is None       # a sibling kind, not a subclass
    with pytest.raises(NotImplementedError, match=r"^input quantizer GeluLogQuantizer$"):
        reg.get(GeluLogQuantizer(4))
    with pytest.raises(ValueError, match=r"UniformQuantizer already has a handler here \(input quantizer\)"):
        reg.register(UniformQuantizer, "other")
    assert reg.kinds() == (UniformQuantizer,)
    assert issubclass(MyUniform, Quantizer)

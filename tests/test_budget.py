"""The memory budget bounds what calibration allocates; results do not depend on threads or workers."""
import threading

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import ptq4vit
import ptq4vit.calib.run as run_module
from ptq4vit.calib import default_memory_budget, intra_op_threads
from ptq4vit.calib.budget import SiteCost, _search_peaks
from ptq4vit.errors import UserError

from conftest import make_tiny

FAST = dict(n_candidates=12, progress=False)
MIB = 1 << 20

#: Allocations the plan leaves out on purpose: quantizer scales, candidate grids, per-row
#: scores of one step ((candidates, rows) in float64), argmax indices: a few KiB each on
#: these models. 256 KiB stays small against the 4-24 MiB budgets tested.
SLACK = 256 << 10


def peak_allocated_during(fn) -> int:
    """Peak bytes the CPU allocator held during ``fn()`` beyond what it held before (profiler memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def planned_and_measured(kind, preset, budget, monkeypatch):
    model, images = make_tiny(kind)
    plans = []
    real = run_module.calibrate_model

    def recording(*args, **kwargs):
        plans.append(real(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(run_module, "calibrate_model", recording)
    monkeypatch.setattr(ptq4vit.api, "calibrate_model", recording)
    # The profiler records the allocations of the calling thread only, so the search runs there;
    # what side-by-side workers add is the plan's arithmetic, tested on hand-made costs below.
    monkeypatch.setattr(run_module, "default_workers", lambda device: 1)
    peak = peak_allocated_during(lambda: ptq4vit.quantize(model, images, preset, 8, 8, memory_budget=budget,
                                                          inplace=True, **FAST))
    return plans[0], peak


@pytest.mark.parametrize("kind, preset, budgets", [("vit", "ptq4vit", (4, 16)), ("vit", "official", (4, 16)),
                                                   ("swin", "base-cosine", (6, 24))])
def test_peak_memory_stays_within_the_budget(kind, preset, budgets, monkeypatch):
    small, large = (b * MIB for b in budgets)
    for budget in (small, large):
        plan, peak = planned_and_measured(kind, preset, budget, monkeypatch)
        assert plan.peak_bytes <= budget
        assert peak <= plan.peak_bytes + SLACK, f"{preset} {kind}: peak {peak / MIB:.2f} MiB, planned {plan.peak_bytes / MIB:.2f}"
        assert (len(plan.groups) > 1) == (budget == small)  # the small budget forces several capture groups


def test_a_budget_too_small_for_one_site_is_refused():
    model, images = make_tiny("vit")
    with pytest.raises(UserError, match=r"memory_budget of 0\.1 MiB is too small: calibrating site '.*' on 6 images"):
        ptq4vit.quantize(model, images, "ptq4vit", memory_budget=100 << 10, **FAST)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_memory_stays_within_the_budget():
    model, images = make_tiny("vit")
    model, images = model.cuda(), images.cuda()
    budget = 3 * MIB
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ptq4vit.quantize(model, images, "ptq4vit", 8, 8, memory_budget=budget, inplace=True, **FAST)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before <= budget + SLACK


def test_parameters_keep_requires_grad_and_get_no_grad():
    model, images = make_tiny("vit")
    q = ptq4vit.quantize(model, images, "ptq4vit", 8, 8, **FAST)
    assert all(p.requires_grad and p.grad is None for p in q.parameters())


@pytest.mark.parametrize("kind, preset", [("vit", "ptq4vit"), ("swin", "official"), ("swin", "base-cosine")])
def test_search_scales_do_not_depend_on_the_number_of_workers(kind, preset, monkeypatch):
    # Capture passes keep their fixed thread count: the kl-official gradients of "official" are
    # rounding noise, and on this CPU a tiny Swin's change with it.
    model, images = make_tiny(kind)
    before = torch.get_num_threads()
    chosen = {}
    for n in (1, 2, 3):
        monkeypatch.setattr(run_module, "default_workers", lambda device, n=n: n)
        chosen[n] = ptq4vit.quantize(model, images, preset, 6, 6, **FAST).qparams()
        assert torch.get_num_threads() == before  # restored
    assert chosen[1] == chosen[2] == chosen[3]


def test_workers_search_sites_side_by_side_on_one_thread_each(monkeypatch):
    model, images = make_tiny("vit")
    meeting = threading.Barrier(2, timeout=10)  # broken unless two sites are searched at once
    seen, lock = [], threading.Lock()
    real = run_module.calibrate_site

    def recording(site, inputs, grad, preset, budget):
        with lock:
            first_two = len(seen) < 2
            seen.append((threading.get_ident(), torch.get_num_threads(), budget))
        if first_two:
            meeting.wait()
        real(site, inputs, grad, preset, budget)

    monkeypatch.setattr(run_module, "calibrate_site", recording)
    monkeypatch.setattr(run_module, "default_workers", lambda device: 2)
    plans = []
    real_plan = run_module.make_plan
    monkeypatch.setattr(run_module, "make_plan", lambda *a, **k: plans.append(real_plan(*a, **k)) or plans[-1])
    ptq4vit.quantize(model, images, "ptq4vit", 8, 8, **FAST)
    assert len({ident for ident, _, _ in seen}) == 2
    assert {threads for _, threads, _ in seen} == {1}
    assert {budget for _, _, budget in seen} == {plans[0].step_bytes // 2}


def test_a_failing_site_search_stops_calibration_with_its_error(monkeypatch):
    model, images = make_tiny("vit")

    def failing(site, inputs, grad, preset, budget):
        raise RuntimeError("search failed on purpose")

    monkeypatch.setattr(run_module, "calibrate_site", failing)
    monkeypatch.setattr(run_module, "default_workers", lambda device: 2)
    with pytest.raises(RuntimeError, match="search failed on purpose"):
        ptq4vit.quantize(model, images, "ptq4vit", 8, 8, **FAST)


def test_the_plan_counts_the_sites_in_flight_together():
    # Per image: held, work; fixed bytes. 2 images, steps of 3 bytes (6 with their temporaries).
    group = [SiteCost(held=10, work=5, fixed=1), SiteCost(held=20, work=2), SiteCost(held=1, work=1, fixed=100)]
    # One worker: the third site's start is the peak: 1*2 + 1*2 + 100 + 6.
    assert _search_peaks(group, 2, 3, workers=1) == 110
    # Two: the second site ((20+2)*2 = 44) may still run when the third starts.
    assert _search_peaks(group, 2, 3, workers=2) == 110 + 44
    # Three: both earlier sites ((10+5)*2 + 1 = 31 and 44) may.
    assert _search_peaks(group, 2, 3, workers=3) == 110 + 44 + 31


def test_quantize_refuses_a_thread_count_below_one():
    model, images = make_tiny("vit")
    with pytest.raises(UserError, match="threads must be a positive integer, got 0"):
        ptq4vit.quantize(model, images, "ptq4vit", 8, 8, threads=0, **FAST)


def test_intra_op_threads_restores_the_setting():
    before = torch.get_num_threads()
    with intra_op_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with intra_op_threads(1):
            raise RuntimeError
    assert torch.get_num_threads() == before


def test_default_budget_follows_the_cgroup_limit(tmp_path):
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "meminfo").write_text("MemAvailable: 67108864 kB\n")   # 64 GiB on the host
    (tmp_path / "proc" / "self" / "cgroup").write_text("0::/\n")
    (tmp_path / "cg").mkdir()
    (tmp_path / "cg" / "cgroup.controllers").write_text("memory\n")
    (tmp_path / "cg" / "memory.max").write_text(str(8 << 30))
    (tmp_path / "cg" / "memory.current").write_text(str(2 << 30))
    assert default_memory_budget(torch.device("cpu"), tmp_path / "cg", tmp_path / "proc") == 1536 * MIB
    (tmp_path / "cg" / "memory.current").write_text(str(7 << 30))    # 1 GiB left: half of it, not less than 512 MiB
    assert default_memory_budget(torch.device("cpu"), tmp_path / "cg", tmp_path / "proc") == 512 * MIB
    (tmp_path / "cg" / "memory.max").write_text("max\n")
    assert default_memory_budget(torch.device("cpu"), tmp_path / "cg", tmp_path / "proc") == 16 << 30


@pytest.mark.parametrize("preset, overrides, small", [
    ("ptq4vit", {}, 4),
    # GPTQ, bias correction and smoothing rewrite weights and biases; two copies of them are reserved.
    ("rotq", dict(bias_correction=True), 14),
    ("deploy8", {}, 13),
])
def test_results_do_not_depend_on_the_memory_budget(preset, overrides, small, monkeypatch):
    """A small budget splits calibration into several capture passes (and smaller ones); the later
    passes must still see the float model, so every scale and weight is the one budget gets."""
    model, images = make_tiny("vit")
    plans = []
    real = run_module.calibrate_model

    def recording(*args, **kwargs):
        plans.append(real(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(ptq4vit.api, "calibrate_model", recording)
    results = []
    for budget in (1 << 30, small * MIB):
        q = ptq4vit.quantize(model, images, preset, 6, 6, memory_budget=budget, **FAST, **overrides)
        results.append((q.qparams(), q.model.state_dict()))
    assert len(plans[0].groups) == 1 and len(plans[1].groups) > 1
    (qp_large, sd_large), (qp_small, sd_small) = results
    assert qp_large == qp_small
    assert sd_large.keys() == sd_small.keys()
    for k in sd_large:
        assert torch.equal(sd_large[k], sd_small[k]), k

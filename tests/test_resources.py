"""Machine probing on fake cgroup and /proc trees (cgroup v1 and v2, limited and unlimited)."""
from pathlib import Path

import pytest

from ptq4vit.calib.resources import (available_memory, cgroup_cpu_quota, cgroup_memory_headroom,
                                     physical_available_memory, usable_cpus)

GIB = 1 << 30


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def proc(tmp_path):
    root = tmp_path / "proc"
    write(root, "meminfo", "MemTotal:       32000000 kB\nMemFree:  1000 kB\nMemAvailable:   20971520 kB\n")
    return root


def v2_tree(tmp_path, own="/job/step"):
    cg = tmp_path / "cg"
    write(cg, "cgroup.controllers", "cpu memory\n")
    write(tmp_path / "proc", "self/cgroup", f"0::{own}\n")
    return cg


def test_v2_memory_limit_minus_unreclaimable_use(tmp_path, proc):
    cg = v2_tree(tmp_path)
    write(cg, "job/step/memory.max", str(4 * GIB))
    write(cg, "job/step/memory.current", str(GIB + 4096))
    write(cg, "job/step/memory.stat", "anon 1\ninactive_file 4096\n")
    assert cgroup_memory_headroom(cg, proc) == 3 * GIB
    assert available_memory(cg, proc) == 3 * GIB          # below the host's 20 GiB available
    assert physical_available_memory(proc) == 20 * GIB


def test_v2_parent_limit_applies_and_max_means_unlimited(tmp_path, proc):
    cg = v2_tree(tmp_path)
    write(cg, "job/step/memory.max", "max\n")
    write(cg, "job/memory.max", str(2 * GIB))
    write(cg, "job/memory.current", str(GIB // 2))
    assert cgroup_memory_headroom(cg, proc) == GIB + GIB // 2
    write(cg, "job/memory.max", "max\n")
    assert cgroup_memory_headroom(cg, proc) is None
    assert available_memory(cg, proc) == 20 * GIB        # unlimited cgroup: the host's available memory


def test_v2_cpu_quota(tmp_path, proc):
    cg = v2_tree(tmp_path)
    write(cg, "job/step/cpu.max", "150000 100000\n")
    assert cgroup_cpu_quota(cg, proc) == 1.5
    assert usable_cpus(cg, proc, affinity=8) == 2
    assert usable_cpus(cg, proc, affinity=1) == 1
    write(cg, "job/step/cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(cg, proc) is None
    assert usable_cpus(cg, proc, affinity=8) == 8
    write(cg, "cpu.max", "50000 100000\n")                # a quota on the root level counts too
    assert usable_cpus(cg, proc, affinity=8) == 1


def test_v1_memory_and_cpu(tmp_path, proc):
    cg = tmp_path / "cg"
    write(proc, "self/cgroup", "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n0::/\n")
    write(cg, "memory/docker/abc/memory.limit_in_bytes", str(8 * GIB))
    write(cg, "memory/docker/abc/memory.usage_in_bytes", str(3 * GIB))
    write(cg, "memory/docker/abc/memory.stat", "cache 5\ntotal_inactive_file 1073741824\n")
    write(cg, "memory/memory.limit_in_bytes", "9223372036854771712")   # v1's "unlimited"
    write(cg, "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "300000")
    write(cg, "cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000")
    write(cg, "cpu,cpuacct/cpu.cfs_quota_us", "-1")
    write(cg, "cpu,cpuacct/cpu.cfs_period_us", "100000")
    assert cgroup_memory_headroom(cg, proc) == 6 * GIB
    assert cgroup_cpu_quota(cg, proc) == 3.0
    assert usable_cpus(cg, proc, affinity=16) == 3


def test_v1_namespace_shows_own_cgroup_as_root(tmp_path, proc):
    # Inside a cgroup namespace /proc/self/cgroup names a path that the mount does not show.
    cg = tmp_path / "cg"
    write(proc, "self/cgroup", "4:memory:/not/visible\n")
    write(cg, "memory/memory.limit_in_bytes", str(GIB))
    write(cg, "memory/memory.usage_in_bytes", "0")
    assert cgroup_memory_headroom(cg, proc) == GIB
    assert cgroup_cpu_quota(cg, proc) is None             # no cpu hierarchy at all


def test_nothing_readable_means_unknown(tmp_path):
    assert cgroup_memory_headroom(tmp_path / "none", tmp_path / "none") is None
    assert available_memory(tmp_path / "none", tmp_path / "none") is None
    assert usable_cpus(tmp_path / "none", tmp_path / "none", affinity=3) == 3



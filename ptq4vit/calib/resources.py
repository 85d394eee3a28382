"""What this process may use of the machine: memory and CPUs, as the container limits them.

``os.cpu_count()`` and the free physical pages describe the host, not the container: a job
limited by its cgroup to 2 CPUs and 4 GiB on a 64-core, 512 GiB host that sizes itself by
the host gets throttled or killed. Every probe reads its files under directories passed in
(``cgroup_root``, ``proc_root``), so tests feed it fake trees; nothing is cached.

Both cgroup layouts are read: v2 (``memory.max``, ``memory.current``, ``cpu.max`` in the
unified tree) and v1 (``memory/memory.limit_in_bytes``, ``memory.usage_in_bytes``,
``cpu/cpu.cfs_quota_us`` and ``cpu.cfs_period_us``). Limits are hierarchical, so every
ancestor of the process's cgroup counts; where the process's path is not visible under the
mount (a cgroup namespace shows the own cgroup as the root), the root itself is read.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]

#: v1 reports "no limit" as a huge page-aligned number (LONG_MAX rounded down to pages).
_V1_UNLIMITED = 1 << 62


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _stat_field(path: Path, field: str) -> int:
    text = _read(path) or ""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == field and value.strip().isdigit():
            return int(value)
    return 0


def _own_cgroups(proc_root: Path) -> dict[str, str]:
    """``{controller: path}`` of this process, from ``/proc/self/cgroup`` (``""`` is the v2 entry)."""
    paths: dict[str, str] = {}
    for line in (_read(proc_root / "self" / "cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            paths[""] = path
        for c in controllers.split(","):
            if c:
                paths[c] = path
        paths.setdefault(controllers, path)
    return paths


def _levels(mount: Path, own_path: Optional[str]) -> Iterator[Path]:
    """The directories of the process's cgroup and of its ancestors under ``mount``, leaf first."""
    if own_path:
        rel = [p for p in own_path.split("/") if p]
        for depth in range(len(rel), 0, -1):
            d = mount.joinpath(*rel[:depth])
            if d.is_dir():
                yield d
    yield mount


def _v1_mount(cgroup_root: Path, controller: str) -> Optional[Path]:
    """The v1 hierarchy holding ``controller`` (``cpu`` is often mounted as ``cpu,cpuacct``)."""
    for name in (controller, f"{controller},cpuacct", f"cpuacct,{controller}"):
        if (cgroup_root / name).is_dir():
            return cgroup_root / name
    return None


def _is_v2(cgroup_root: Path) -> bool:
    return (cgroup_root / "cgroup.controllers").is_file()


def _min_over_levels(cgroup_root: Path, proc_root: Path, controller: str,
                     v2_reader: Callable[[Path], Optional[float]],
                     v1_reader: Callable[[Path], Optional[float]]) -> Optional[float]:
    own = _own_cgroups(proc_root)
    if _is_v2(cgroup_root):
        mount, own_path, reader = cgroup_root, own.get(""), v2_reader
    else:
        mount = _v1_mount(cgroup_root, controller)
        if mount is None:
            return None
        own_path, reader = own.get(controller), v1_reader
    values = [v for d in _levels(mount, own_path) if (v := reader(d)) is not None]
    return min(values) if values else None


def _v2_memory_headroom(d: Path) -> Optional[float]:
    limit = _read(d / "memory.max")
    if limit is None or not limit.isdigit():
        return None  # "max" or absent: no limit at this level
    used = int(_read(d / "memory.current") or 0)
    # Inactive file pages are page cache the kernel reclaims before it runs out.
    used -= _stat_field(d / "memory.stat", "inactive_file")
    return max(0, int(limit) - max(0, used))


def _v1_memory_headroom(d: Path) -> Optional[float]:
    limit = _read(d / "memory.limit_in_bytes")
    if limit is None or not limit.isdigit() or int(limit) >= _V1_UNLIMITED:
        return None
    used = int(_read(d / "memory.usage_in_bytes") or 0)
    used -= _stat_field(d / "memory.stat", "total_inactive_file")
    return max(0, int(limit) - max(0, used))


def _v2_cpu_quota(d: Path) -> Optional[float]:
    fields = (_read(d / "cpu.max") or "").split()
    if len(fields) != 2 or not fields[0].isdigit() or not fields[1].isdigit() or int(fields[1]) == 0:
        return None  # "max 100000": no quota
    return int(fields[0]) / int(fields[1])


def _v1_cpu_quota(d: Path) -> Optional[float]:
    quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
    if not quota or not period or not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return None  # -1: no quota
    return int(quota) / int(period)


def cgroup_memory_headroom(cgroup_root: PathLike = "/sys/fs/cgroup", proc_root: PathLike = "/proc") -> Optional[int]:
    """Bytes this process's cgroup may still take (limit minus non-reclaimable use), or None if unlimited."""
    v = _min_over_levels(Path(cgroup_root), Path(proc_root), "memory", _v2_memory_headroom, _v1_memory_headroom)
    return None if v is None else int(v)


def cgroup_cpu_quota(cgroup_root: PathLike = "/sys/fs/cgroup", proc_root: PathLike = "/proc") -> Optional[float]:
    """CPUs' worth of time per period the cgroup allows (e.g. 1.5), or None without a quota."""
    return _min_over_levels(Path(cgroup_root), Path(proc_root), "cpu", _v2_cpu_quota, _v1_cpu_quota)


def physical_available_memory(proc_root: PathLike = "/proc") -> Optional[int]:
    """``MemAvailable`` of ``/proc/meminfo`` (free plus reclaimable), or None where it is not reported."""
    for line in (_read(Path(proc_root) / "meminfo") or "").splitlines():
        key, _, value = line.partition(":")
        fields = value.split()
        if key == "MemAvailable" and fields and fields[0].isdigit():
            return int(fields[0]) * 1024
    return None


def available_memory(cgroup_root: PathLike = "/sys/fs/cgroup", proc_root: PathLike = "/proc") -> Optional[int]:
    """The smaller of the host's available memory and the cgroup's headroom (None if neither is known)."""
    known = [v for v in (physical_available_memory(proc_root), cgroup_memory_headroom(cgroup_root, proc_root))
             if v is not None]
    return min(known) if known else None


def usable_cpus(cgroup_root: PathLike = "/sys/fs/cgroup", proc_root: PathLike = "/proc",
                affinity: Optional[int] = None) -> int:
    """CPUs this process can keep busy: its affinity mask, capped by the cgroup quota (rounded up), at least 1."""
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            affinity = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, proc_root)
    if quota is not None:
        affinity = min(affinity, max(1, math.ceil(quota)))
    return max(1, affinity)


__all__ = ["available_memory", "cgroup_cpu_quota", "cgroup_memory_headroom", "physical_available_memory",
           "usable_cpus"]

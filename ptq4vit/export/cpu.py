"""What the CPU this process runs on offers for int8 GEMMs (read at load time, never baked into a file)."""
from __future__ import annotations

import functools
import platform

__all__ = ["cpu_flags", "cpu_has_vnni", "cpu_name", "u8s8_saturates"]

#: Flags that matter for int8 and bf16 inference on x86.
INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
              "amx_bf16", "avx_vnni_int8")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_flags() -> tuple:
    """The :data:`INT8_FLAGS` this CPU advertises (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return tuple(f for f in INT8_FLAGS if f in have)
    return ()


def cpu_name() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def cpu_has_vnni() -> bool:
    """Whether this CPU has AVX512-VNNI or AVX-VNNI: u8×s8 dot products without int16 saturation."""
    flags = cpu_flags()
    return "avx512_vnni" in flags or "avx_vnni" in flags


def u8s8_saturates() -> bool:
    """Whether int8 kernels here may saturate u8×s8 pair sums at int16: an x86 CPU without VNNI
    (``vpmaddubsw``, ONNX Runtime's and OpenVINO's AVX2 path)."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686") and not cpu_has_vnni()

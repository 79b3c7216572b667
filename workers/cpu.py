"""What this CPU is and which SIMD instructions it has: what the native kernels need, and what a
test report or a load line names so that a result on one machine can be told from one everywhere.

Read from the CPU itself (``/proc/cpuinfo``), not from torch: ``ATEN_CPU_CAPABILITY`` lowers what
torch dispatches to, not what the CPU can run."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

# the SIMD extensions our kernels and torch's choose between, in /proc/cpuinfo's spelling
SIMD = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")
NATIVE_NEEDS = frozenset({"avx2", "fma", "f16c"})  # workers/native.py's build flags


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo; empty where there is none (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def model_name() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def simd_features() -> frozenset[str] | None:
    """The SIMD extensions of ``SIMD`` this CPU reports; None where the CPU cannot be asked."""
    flags = _cpuinfo().get("flags")
    if flags is None:
        return None
    return frozenset(flags.split()) & frozenset(SIMD)


def runs_native_kernels() -> bool:
    """Whether this CPU can run the native kernels' instructions."""
    features = simd_features()
    if features is None:  # no /proc/cpuinfo: trust what torch detected
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return NATIVE_NEEDS.issubset(features)


def describe() -> str:
    """One line: the CPU, its SIMD extensions and what torch dispatches to."""
    features = simd_features()
    listed = " ".join(f for f in SIMD if features and f in features) or "unknown"
    return f"{model_name()}; SIMD: {listed}; torch kernels: {torch.backends.cpu.get_cpu_capability()}"

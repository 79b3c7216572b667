"""The CPU as the worker sees it: its features come from the CPU, not from what torch dispatches to."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from workers import cpu, native


def test_describe_names_the_cpu_its_simd_and_torchs_choice():
    line = cpu.describe()
    assert cpu.model_name() in line and "torch kernels:" in line
    features = cpu.simd_features()
    if features is not None:
        assert features <= set(cpu.SIMD)
        assert all(f in line for f in features)


@pytest.mark.skipif(not cpu.runs_native_kernels(), reason="this CPU has no AVX2 with FMA and F16C")
def test_native_kernels_do_not_depend_on_torchs_dispatch_level():
    # ATEN_CPU_CAPABILITY=default makes torch use its plain kernels; the CPU still runs ours
    # ... and the path picked is the best one the CPU reports (avx512vnni on an AVX-512 VNNI CPU),
    # whatever torch dispatches to
    code = "from workers import native; print(native.kernels() is not None, native.path_name())"
    best = native.runnable_paths()[-1]
    for level in ("default", "avx2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "ATEN_CPU_CAPABILITY": level, native.ENV: "auto"},
        )
        assert out.stdout.strip() == f"True {best}", (level, out.stderr[-2000:])

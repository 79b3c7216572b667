"""The CPU as the worker sees it: its features come from the CPU, not from what torch dispatches to."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from workers import cpu


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
    code = "from workers import native; print(native.kernels() is not None)"
    for level in ("default", "avx2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "ATEN_CPU_CAPABILITY": level},
        )
        assert out.stdout.strip() == "True", (level, out.stderr[-2000:])

"""The GPU path: Triton paged attention for decode rows, sampling on the device (one host sync per
step) and CUDA graphs for decode steps. Every module imports on a machine without a GPU; Triton
kernels run on the CPU under ``TRITON_INTERPRET=1`` (tests), capture needs CUDA."""

import os

FORCE_ENV = "CORTEX_FORCE_GPU_PATH"  # test hook: "1" builds the GPU path on a CPU worker too


def forced() -> bool:
    """Whether the test hook asks for the GPU path on a CPU worker (read where it is used: tests set
    it per test). Here, not in ``step.py``, so that the model code can ask without importing it."""
    return os.environ.get(FORCE_ENV, "") == "1"

"""The GPU path: Triton paged attention for decode rows, sampling on the device (one host sync per
step) and CUDA graphs for decode steps. Every module imports on a machine without a GPU; Triton
kernels run on the CPU under ``TRITON_INTERPRET=1`` (tests), capture needs CUDA."""

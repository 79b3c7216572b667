"""The native decode step's two ways of running (workers/kernels/decode.c): a few rows (up to 8)
go through every layer in one parallel region, the threads splitting each product and the
attention between them; more rows take one parallel region per kernel call. Both must give the
layer-by-layer forward's logits bit for bit, at one sequence and past the one-region limit, and
whatever the number of threads (so however the products' columns and the attention's heads are
split, unevenly included)."""

from __future__ import annotations

import pytest
import torch

from tests.checkpoints import make_checkpoint
from tests.conftest import needs_native_kernels
from tests.test_decode_step import _model, _run

pytestmark = needs_native_kernels


def _decode(model, sequences: int, native: bool, kv_dtype=torch.float32) -> list[torch.Tensor]:
    """`sequences` prompts of different lengths prefilled together, then four all-decode steps."""
    prompts = [[(7 * s + j) % 500 + 3 for j in range(3 + 5 * s % 23)] for s in range(sequences)]
    tables = [[3 * s, 3 * s + 1, 3 * s + 2] for s in range(sequences)]
    return _run(model, native, kv_dtype, prompts, tables, steps=4)


@pytest.mark.parametrize("sequences", [1, 8, 9, 12], ids=lambda n: f"{n}seq")
@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_one_region_and_per_kernel_steps_equal_the_layer_by_layer_forward(tmp_path, sequences, quantize):
    model = _model(make_checkpoint(tmp_path, "llama", tied=True), quantize)
    fused, stepwise = _decode(model, sequences, True), _decode(model, sequences, False)
    assert model._layer_table is not None  # the decode steps did run natively
    for a, b in zip(fused, stepwise, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16], ids=["kv32", "kv16"])
def test_the_step_is_the_same_whatever_the_number_of_threads(tmp_path, threads, arch, kv_dtype):
    model = _model(make_checkpoint(tmp_path, arch, tied=True, kv_heads=4), "int4")
    runs = {}
    for n in (1, 2, 3):
        threads(n)
        runs[n] = _decode(model, 2, True, kv_dtype)
    for n in (2, 3):
        for a, b in zip(runs[n], runs[1], strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_one_sequence_split_by_query_heads_is_the_same_whatever_the_number_of_threads(tmp_path, threads, kv_heads):
    """One sequence has fewer KV heads than the threads want tasks: its attention splits by ranges
    of query heads (a KV head's group between tasks, its query heads computed in groups of 1 to
    4), which must not change a bit of the result."""
    model = _model(make_checkpoint(tmp_path, "qwen3", tied=True, kv_heads=kv_heads), "int4")
    runs = {}
    for n in (1, 2, 3):
        threads(n)
        runs[n] = _decode(model, 1, True, torch.float16)
    for n in (2, 3):
        for a, b in zip(runs[n], runs[1], strict=True):
            assert torch.equal(a, b)

"""The head in the native decode step (workers/kernels/decode.c): where the head is a packed native
linear, an all-decode step goes on from the last layer to the final norm and the head's product in
the same call, the threads splitting the product. Its logits must equal the model's own final norm
and head after the native layers bit for bit: tied (a packed copy of the embedding) and untied
heads, Q8 and Q4, one sequence and several (up to the one-region limit of 8 rows and past it), with
1, 2 or 3 threads. Steps that want every row's logits or the hidden states keep the Python head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.checkpoints import make_checkpoint
from tests.conftest import needs_native_kernels
from tests.test_decode_step import _model, _run
from workers.kv_cache import BLOCK_SIZE, PagedKVCache, StepBatch
from workers.quant import Q4Blocks, QuantLinear

pytestmark = needs_native_kernels


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def model(request, tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama", tied=request.param, kv_heads=4)
    return _model(path, "int4")


def _steps(model, sequences: int, native_head: bool) -> list[torch.Tensor]:
    """`sequences` prompts prefilled together, then three all-decode steps, on the native layers
    with the head in the native call or after it."""
    model.native_head = native_head
    prompts = [[(5 * s + j) % 500 + 3 for j in range(2 + 3 * s % 11)] for s in range(sequences)]
    tables = [[2 * s, 2 * s + 1] for s in range(sequences)]
    try:
        return _run(model, True, torch.float16, prompts, tables, steps=3)
    finally:
        model.native_head = True


@pytest.mark.parametrize("n", [1, 2, 3], ids=lambda n: f"{n}threads")
@pytest.mark.parametrize("sequences", [1, 3, 9], ids=lambda n: f"{n}seq")
def test_the_head_in_the_step_equals_the_head_after_it(model, threads, sequences, n):
    threads(n)
    fused, after = _steps(model, sequences, True), _steps(model, sequences, False)
    assert model._head_table is not None and model._layer_table is not None
    for a, b in zip(fused, after, strict=True):
        assert torch.equal(a, b)


def test_a_q4_head_in_the_step_equals_the_head_after_it(model, threads):
    vocab, hidden = model.cfg.vocab_size, model.cfg.hidden_size
    rng = np.random.default_rng(0)
    scales = lambda: rng.normal(0, 0.01, (vocab, hidden // 32)).astype(np.float16).astype(np.float32)  # noqa: E731
    q4 = Q4Blocks(rng.integers(0, 16, (vocab, hidden), dtype=np.uint8), scales(), scales())
    before = model.lm_head
    model.lm_head = QuantLinear.int4(q4, impl="native")
    model.__dict__.pop("_head_table", None)  # built again for the new head
    try:
        for n in (1, 2, 3):
            threads(n)
            for sequences in (1, 9):
                fused, after = _steps(model, sequences, True), _steps(model, sequences, False)
                for a, b in zip(fused, after, strict=True):
                    assert torch.equal(a, b)
        assert model._head_table[1].m  # the Q4 head did run in the step
    finally:
        model.lm_head = before
        model.__dict__.pop("_head_table", None)


@pytest.mark.parametrize("kw", [{"all_logits": True}, {"hidden": True}], ids=["all_logits", "hidden"])
def test_steps_that_want_more_than_the_last_logits_keep_the_python_head(model, kw):
    """The decode step of one sequence, the head in the call or not: the same rows back."""
    layers, kv_heads, head_dim, _ = model.kv_shape()
    out = []
    for native_head in (True, False):
        model.native_head = native_head
        cache = PagedKVCache(layers, kv_heads, head_dim, torch.float32, torch.device("cpu"), 4)
        model(StepBatch.build([([4, 8, 15], 0, [0])], BLOCK_SIZE, torch.device("cpu")), cache)
        out.append(model(StepBatch.build([([16], 3, [0])], BLOCK_SIZE, torch.device("cpu")), cache, **kw))
    model.native_head = True
    assert torch.equal(out[0], out[1])
    want = model.cfg.hidden_size if "hidden" in kw else model.cfg.vocab_size
    assert out[0].shape == (1, want)

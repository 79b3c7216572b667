"""Tensor parallelism through the graphed decode step: two worker processes joined by a gloo group,
with the GPU path forced on (``CORTEX_FORCE_GPU_PATH=1``: the graphs' padded step runs eagerly, as
without CUDA, with the same all-reduces a captured step holds), compute what one plain CPU worker
computes. On a GPU the same code captures each bucket with its NCCL all-reduces inside; every rank
builds the same buckets from the same ``LoadDenseShard`` and pads a step the same way, which is what
the padded rows here check."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.checkpoints import make_checkpoint, make_hybrid_checkpoint
from tests.tp_harness import rel_err, run_tp_steps, with_sampled_tokens
from workers.gpu import FORCE_ENV

SAME = 1e-5  # relative: the all-reduce only changes the order of the row-parallel sums
PROMPTS = [[3, 17, 42, 99, 7], [8, 400, 23, 61, 5, 90, 311, 2, 77], [250, 11, 5]]
DECODES = 5


def _plan() -> list[list[tuple]]:
    """Three prompts in one step, then greedy decoding of all three (padded to a bucket of 4), then
    of the first two (a bucket of 2, no padding). Parts: (seq, tokens or None, start, slot, sample);
    None is the token sampled for the sequence on its previous step."""
    plan = [[(i, p, 0, i, True) for i, p in enumerate(PROMPTS)]]
    for step in range(DECODES):
        plan.append([(i, None, len(p) + step, i, True) for i, p in enumerate(PROMPTS)])
    plan.append([(i, None, len(p) + DECODES, i, True) for i, p in enumerate(PROMPTS[:2])])
    return plan


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tp-graphs"), "qwen3", tied=True, kv_heads=2)


def test_tp2_through_the_graphed_decode_step_computes_what_one_cpu_worker_computes(qwen3, monkeypatch):
    monkeypatch.delenv(FORCE_ENV, raising=False)
    plan = _plan()
    one = run_tp_steps(qwen3, 1, plan, state_slots=0)
    monkeypatch.setenv(FORCE_ENV, "1")  # the rank processes inherit it
    two = run_tp_steps(qwen3, 2, with_sampled_tokens(plan, one.tokens), state_slots=0)

    sampled = [t for step in one.tokens for t in step]
    assert len(set(sampled)) > 3, "greedy decoding is stuck on a token: a weak test"
    assert two.tokens == one.tokens  # rank 0 of the group chose what the lone worker chose
    # the forward ran on the graphs' padded rows: three decodes fill a bucket of 4, two a bucket of 2
    assert [len(s) for s in two.logits] == [3] + [4] * DECODES + [2]
    for i, (a, b) in enumerate(zip(one.logits, two.logits, strict=True)):
        assert rel_err(a, b[: len(a)]) < SAME, f"step {i}"


@pytest.fixture(scope="module")
def qwen3_5(tmp_path_factory) -> Path:
    return make_hybrid_checkpoint(tmp_path_factory.mktemp("tp-graphs-hybrid"))


def test_a_hybrid_tp2_group_decodes_through_the_graphs_state_slots(qwen3_5, monkeypatch):
    """The hybrid's state slots are static inputs of the graphed step: each rank's half of every
    state is read and written through them, the padding rows in the scratch slot."""
    monkeypatch.delenv(FORCE_ENV, raising=False)
    plan = _plan()
    one = run_tp_steps(qwen3_5, 1, plan, state_slots=3)
    monkeypatch.setenv(FORCE_ENV, "1")
    two = run_tp_steps(qwen3_5, 2, with_sampled_tokens(plan, one.tokens), state_slots=3)
    assert two.tokens == one.tokens
    assert [len(s) for s in two.logits] == [3] + [4] * DECODES + [2]
    for i, (a, b) in enumerate(zip(one.logits, two.logits, strict=True)):
        assert rel_err(a, b[: len(a)]) < SAME, f"step {i}"

"""A step beside running streams carries only as much prompt as fits in ``step_target_ms``.

The scheduler learns from its model's own step times how long a decode-only step takes and what
each unit of prefill adds; the chunk it gives a prompt shrinks as the prompt's context grows
(attention), and a prompt with nobody decoding beside it still gets whole chunks.
"""

from __future__ import annotations

import math

import pytest

from cortex.engine.blocks import BlockManager
from cortex.engine.scheduler import Scheduler
from cortex.engine.step_clock import (
    PROBE_UNITS,
    StepClock,
    attention_span_equivalent,
    tokens_within,
    units,
)
from tests.test_engine import _seq
from workers.arch import ModelConfig

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3, head_dim=64)


def test_attention_span_equivalent_follows_the_model_shape():
    """SmolLM2-135M: 3.54 M multiply-adds per token per layer in its linears, 1,152 per position
    attended: attention matches the linears at about 3,072 tokens of context."""
    cfg = ModelConfig(
        arch="llama",
        vocab_size=49152,
        num_layers=30,
        rms_norm_eps=1e-5,
        rope_theta=1e5,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        **SMOLLM2,
    )
    assert attention_span_equivalent(cfg) == pytest.approx(3072)


@pytest.mark.parametrize("start", [0, 100, 3000, 6000])
@pytest.mark.parametrize("allowance", [0.5, 3, 18, 250])
def test_tokens_within_is_the_most_that_fits(start, allowance):
    k = 3072.0
    n = tokens_within(allowance, start, k)
    assert n >= 1
    if n > 1:
        assert units(n, start, k) <= allowance + 1e-9
    assert units(n + 1, start, k) > allowance  # one more would not fit


def test_the_clock_learns_the_fixed_cost_and_the_cost_per_unit():
    clock = StepClock()
    assert clock.prefill_allowance(0.05) is None  # nothing timed yet
    for _ in range(20):
        clock.observe(0, 0.006)  # decode-only steps: 6 ms
        clock.observe(40, 0.006 + 40 * 0.0025)  # with 40 units of prefill: 2.5 ms each
    assert clock.fixed_s == pytest.approx(0.006, rel=0.01)
    assert clock.per_unit_s == pytest.approx(0.0025, rel=0.05)
    assert clock.prefill_allowance(0.05) == pytest.approx((0.05 - 0.006) / 0.0025, rel=0.05)


def _decoding_and_long_prompt(target_s: float, k: float = 3072.0) -> tuple[Scheduler, object, object]:
    sched = Scheduler(BlockManager(2048, 16), 512, 256, 8, step_target_s=target_s, attention_k=k)
    stream = _seq(8)
    sched.add(stream)
    sched.done(sched.plan())
    stream.tokens.append(1)  # it decodes from now on
    prompt = _seq(7000)
    sched.add(prompt)
    return sched, stream, prompt


def _step(sched: Scheduler, stream, clock_s: tuple[float, float] | None = None) -> int:
    """Plan one step, finish it (timed as fixed + per-unit cost when given); the prompt's chunk."""
    work = sched.plan()
    assert work[0].seq is stream and work[0].decode  # the stream's token always comes first
    chunk = sum(len(w.tokens) for w in work if not w.decode)
    seconds = None
    if clock_s:
        fixed, per_unit = clock_s
        seconds = fixed + per_unit * sum(units(len(w.tokens), w.start, sched.attention_k) for w in work if not w.decode)
    sched.done(work, seconds)
    stream.tokens.append(1)
    return chunk


def test_beside_a_decoding_stream_chunks_shrink_as_the_context_grows():
    sched, stream, prompt = _decoding_and_long_prompt(target_s=0.05)
    # nothing known yet: a small probe (15 tokens), not 256
    assert _step(sched, stream) == tokens_within(PROBE_UNITS, 0, 3072)
    sched.clock.observe(0, 0.006)  # a decode-only step took 6 ms
    sched.clock.observe(10, 0.031)  # one with 10 units of prefill, 31 ms
    chunks, starts = [], []
    while prompt.pending > 1:
        starts.append(prompt.computed)
        chunks.append(_step(sched, stream, (0.006, 0.0025)))
    allowance = (0.05 - 0.006) / 0.0025  # about 17.6 units per step
    for start, n in zip(starts, chunks, strict=True):
        assert n == 1 or units(n, start, 3072) <= allowance * 1.1  # every step predicted within target
    assert chunks[0] >= 14 and chunks[-1] <= 6  # 16-ish tokens at the start, 5 at 7,000 tokens
    assert chunks == sorted(chunks, reverse=True)


def test_new_prompts_still_start_when_decoding_alone_takes_longer_than_the_target():
    """A big batch on a slow device: decode-only steps of 80 ms against a 50 ms target. New
    requests must not wait for every stream to end: each step carries at least a probe's worth."""
    sched, stream, prompt = _decoding_and_long_prompt(target_s=0.05)
    sched.clock.observe(0, 0.08)
    sched.clock.observe(10, 0.105)
    assert sched.clock.prefill_allowance(0.05) < 0
    assert _step(sched, stream) == tokens_within(PROBE_UNITS, 0, 3072)
    assert prompt.computed > 0


def test_without_a_target_or_without_decodes_prompts_get_whole_chunks():
    sched, stream, _ = _decoding_and_long_prompt(target_s=0.0)
    assert _step(sched, stream) == 256
    alone = Scheduler(BlockManager(2048, 16), 512, 256, 8, step_target_s=0.05, attention_k=3072.0)
    prompt = _seq(7000)
    alone.add(prompt)
    alone.clock.observe(0, 0.006)
    alone.clock.observe(10, 1.0)  # even a slow clock: nobody is waiting on this step
    work = alone.plan()
    assert [len(w.tokens) for w in work] == [256]


def test_an_infinite_span_means_chunks_cost_their_length():
    assert units(10, 5000, math.inf) == 10
    assert tokens_within(17.5, 5000, math.inf) == 17

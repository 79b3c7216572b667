"""Multi-step decode (`[engine] decode_steps`): while every running sequence decodes and nothing
waits, one GenerateStep runs several forwards back to back, each sequence fed the token it has just
sampled, and the leader applies and streams their tokens together. Nothing a client sees may change
but how tokens group into events: the same text, the same usage, the same stops, nothing held
afterwards."""

from __future__ import annotations

import threading

import pytest

from cortex.engine.blocks import BlockManager
from cortex.engine.scheduler import Scheduler
from rpc.messages import GenerateStep, LoadDenseShard, SamplingParams, SeqInput, StepResult
from tests.conftest import scrape, value, wait_for
from tests.test_engine import _seq
from tests.test_overlap import _answers, _client, _kv_used, stops_and_cancels_as_the_reference_does, tiny_servers

# -- the plan: when a step is several forwards ------------------------------------------------------


def _decoding(*prompts: int, max_tokens: int = 100) -> tuple[Scheduler, list]:
    """A scheduler whose sequences have computed their prompts and sampled one token each."""
    sched = Scheduler(BlockManager(64, 4), max_batch_tokens=64, prefill_chunk=64, max_seqs=8)
    seqs = [_seq(n, max_tokens) for n in prompts]
    for s in seqs:
        sched.add(s)
    sched.done(sched.plan())
    for s in seqs:
        s.tokens.append(7)
    return sched, seqs


def test_a_decoding_batch_takes_several_forwards_with_room_for_them_all():
    sched, (a, b) = _decoding(6, 3)
    work = sched.plan(decode_steps=4)
    assert [(w.seq, w.start, w.steps) for w in work] == [(a, 6, 4), (b, 3, 4)]
    assert len(a.block_table) == 3 and len(b.block_table) == 2  # positions up to 9 and 6
    sched.done(work, ran=4)
    assert (a.computed, b.computed) == (10, 7)  # the fed token and the three sampled ones fed after it
    a.tokens += [1, 2, 3, 4]
    assert a.pending == 1  # once its four sampled tokens are applied, it decodes on from the last
    assert sched.plan(decode_steps=1)[0].steps == 1  # 1: a token per step


def test_a_step_is_one_forward_when_a_token_decides_the_next_or_someone_waits():
    sched, (a,) = _decoding(6, max_tokens=3)
    assert sched.plan(decode_steps=4)[0].steps == 2  # it may make only two more tokens
    sched, (a,) = _decoding(6)
    a.constraint = object()  # a grammar: the next mask depends on each token
    assert sched.plan(decode_steps=4)[0].steps == 1
    sched, (a,) = _decoding(6)
    a.sampling = SamplingParams(logprobs=2)
    assert sched.plan(decode_steps=4)[0].steps == 1
    sched, a = Scheduler(BlockManager(64, 4), max_batch_tokens=64, prefill_chunk=5, max_seqs=8), _seq(6)
    sched.add(a)
    sched.done(sched.plan())  # a prompt chunk that ends one token short of the prompt's end
    (w,) = sched.plan(decode_steps=4)
    assert (w.decode, w.samples, w.steps) == (True, True, 1)  # its first token goes out alone
    sched, (a,) = _decoding(6)
    sched.add(_seq(9))  # a newcomer's prompt would wait for the forwards
    assert [w.steps for w in sched.plan(decode_steps=4)] == [1, 1]
    sched, (a,) = _decoding(6)
    sched.add(_seq(200))
    sched.plan()  # its prompt is still being prefilled in chunks
    assert [w.steps for w in sched.plan(decode_steps=4)] == [1, 1]


def test_a_preempted_sequence_names_the_blocks_its_last_multi_step_filled():
    sched, (a,) = _decoding(6)
    sched.blocks.prefix_cache = True
    work = sched.plan(decode_steps=4)
    sched.done(work, ran=4)  # positions 6-9 computed; tokens 8 and 9 are not in a's list yet
    a.tokens += [1, 2, 3, 4]
    assert len(a.block_digests) == 1
    sched._preempt(a)
    assert len(a.block_digests) == 0 and len(sched.blocks.by_digest) == 2  # [0, 4) and [4, 8) named


def test_the_forwards_of_a_multi_step_take_about_the_step_target_at_most():
    sched, (a, b) = _decoding(6, 3)
    sched.step_target_s = 0.05
    sched.clock.observe(0, 0.02)  # a decode step of this batch takes 20 ms
    assert [w.steps for w in sched.plan(decode_steps=4)] == [2, 2]
    sched.clock.fixed_s = 0.06
    assert [w.steps for w in sched.plan(decode_steps=4)] == [1, 1]


def test_the_step_overlapped_behind_a_multi_step_starts_after_its_forwards():
    sched, (a,) = _decoding(6, max_tokens=7)
    first = sched.plan(decode_steps=4)
    ahead = sched.plan_ahead(first, decode_steps=4)
    assert [(w.start, w.follows, w.steps) for w in ahead] == [(10, True, 2)]  # 1 + 4 made, 2 left
    assert len(a.block_table) == 3  # room for positions up to 11
    sched, (a,) = _decoding(6, max_tokens=5)
    assert sched.plan_ahead(sched.plan(decode_steps=4), decode_steps=4) == []  # its last tokens are in flight


# -- the worker: several forwards compute what single steps compute -----------------------------------


@pytest.fixture(scope="module")
def worker(tiny_qwen3):
    from workers.arch import ModelConfig
    from workers.worker import Worker

    w = Worker("cpu")
    loaded = w.handle(
        LoadDenseShard(
            model_id="m",
            format="safetensors",
            files=[str(p) for p in sorted(tiny_qwen3.glob("*.safetensors"))],
            config=ModelConfig.from_hf_dir(tiny_qwen3).to_dict(),
            dtype="float32",
            kv_blocks=32,
        )
    )
    assert not hasattr(loaded, "kind"), loaded
    return w


def _step(worker, *seqs: SeqInput, steps: int = 1) -> StepResult:
    got = worker.handle(GenerateStep("m", list(seqs), steps))
    assert isinstance(got, StepResult), got
    return got


def _tokens_one_at_a_time(worker, seq_id: int, prompt: list[int], table: list[int], n: int) -> list[int]:
    greedy = SamplingParams(temperature=0)
    out = _step(worker, SeqInput(seq_id, prompt, 0, greedy, table)).tokens
    for i in range(n - 1):
        out += _step(worker, SeqInput(seq_id, out[-1:], len(prompt) + i, greedy, table)).tokens
    return out


def test_a_multi_step_samples_what_single_steps_sample_and_ends_when_every_sequence_stopped(worker):
    greedy = SamplingParams(temperature=0)
    prompt_a, prompt_b = [5, 9, 14, 3, 22], [8, 1, 30]
    want_a = _tokens_one_at_a_time(worker, 1, prompt_a, [0, 1], 6)
    want_b = _tokens_one_at_a_time(worker, 2, prompt_b, [2, 3], 6)
    first = _step(worker, SeqInput(3, prompt_a, 0, greedy, [4, 5]), SeqInput(4, prompt_b, 0, greedy, [6, 7]))
    assert first.tokens == [want_a[0], want_b[0]] and first.more is None
    a = SeqInput(3, first.tokens[:1], 5, greedy, [4, 5], stop_ids=[want_a[2]])
    b = SeqInput(4, first.tokens[1:], 3, greedy, [6, 7])
    got = _step(worker, a, b, steps=5)
    # a sampled its stop id on the second forward (or sooner: a tiny model may repeat itself), but b
    # had not: every forward ran, a's after its stop unsampled (-1)
    stop_at = want_a.index(want_a[2], 1)
    a_got = want_a[1 : stop_at + 1] + [-1] * (len(want_a) - 1 - stop_at)
    assert [[t, *m] for t, m in zip(got.tokens, got.more, strict=True)] == [a_got, want_b[1:]]
    assert _step(worker, SeqInput(5, prompt_a, 0, greedy, [8, 9])).tokens == want_a[:1]
    alone = _step(worker, SeqInput(5, want_a[:1], 5, greedy, [8, 9], stop_ids=[want_a[2]]), steps=5)
    assert [alone.tokens[0], *alone.more[0]] == want_a[1 : stop_at + 1]  # alone, it ends there


def test_a_multi_step_of_a_prompt_chunk_a_mask_or_logprobs_is_refused(worker):
    for row in (
        SeqInput(9, [1, 2, 3], 0, SamplingParams(), [10]),
        SeqInput(9, [1], 0, SamplingParams(), [10], allowed=b"\xff" * 64),
        SeqInput(9, [1], 0, SamplingParams(logprobs=1), [10]),
    ):
        got = worker.handle(GenerateStep("m", [row], 3))
        assert got.kind == "bad_frame" and "plain decodes only" in got.message


# -- served: the same answers whatever decode_steps is ------------------------------------------------


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_qwen3):
    # step_target_ms = 0: no cap from the step clock, so a loaded machine cannot make them single
    keys = ["decode_steps = 1\nstep_target_ms = 0", "decode_steps = 4\nstep_target_ms = 0"]
    yield from tiny_servers(tmp_path_factory, tiny_qwen3, keys)


def test_multi_steps_answer_exactly_what_single_steps_answer(servers):
    single, multi = servers
    expected = _answers(single, concurrent=False)
    assert _answers(multi, concurrent=False) == expected
    assert _answers(multi, concurrent=True) == expected  # batches that grow and shrink under it
    wait_for(lambda: _kv_used(multi) == 0, what="every KV block free again")


def test_a_multi_step_stream_carries_every_token_once_and_its_usage(servers):
    single, multi = servers
    ask = {"model": "tiny", "max_tokens": 30, "temperature": 0, "extra_body": {"ignore_eos": True}}
    messages = [{"role": "user", "content": "Paris is the capital of"}]
    full = _client(single).chat.completions.create(messages=messages, **ask).choices[0].message.content
    pieces, usage = [], None
    with _client(multi).chat.completions.create(
        messages=messages, stream=True, stream_options={"include_usage": True}, **ask
    ) as stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
    assert "".join(pieces) == full and usage.completion_tokens == 30
    assert len(pieces) < 30  # tokens of one multi-step travel together
    assert value(scrape(multi.metrics_url), "cortex_inter_token_latency_seconds_count", model="tiny") >= 29


def test_a_stop_string_inside_a_multi_step_or_a_client_gone_ends_the_same_and_frees_its_blocks(servers):
    single, multi = servers
    stops_and_cancels_as_the_reference_does(single, multi, cancel_after=2)  # with a multi-step in flight


def test_requests_arriving_during_multi_steps_all_complete(servers):
    _, multi = servers
    client, done = _client(multi), []

    def go(i: int) -> None:
        r = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"request {i}"}],
            max_tokens=12 + i,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        done.append(r.usage.completion_tokens == 12 + i)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert done == [True] * 6


# -- the front: a Delta of several tokens ------------------------------------------------------------


class _Generation:
    """What ``generation.events`` reads of a request: its events, and whether it opens reasoning."""

    reasoning = False

    def __init__(self, *events):
        self._events = events

    def events(self, watch=None, keepalive_s=None):
        yield from self._events


def test_a_delta_of_several_tokens_is_one_event_and_its_reasoning_tokens_count_where_they_fell():
    from cortex.api.generation import Done, Parts, events
    from cortex.chat.output import Reasoning, Text
    from rpc.engine import Delta, Finished

    # tokens: "<think>", "x", "</think>", "\n\n", "y", "z" (the last three in one multi-step delta)
    stream = _Generation(
        Delta("r", "<think>x", 2, pieces=[7, 1]),
        Delta("r", "</think>\n\nyz", 6, pieces=[8, 2, 1, 1]),
        Finished("r", "length", 3, 6),
    )
    got = list(events(stream))
    parts = [e.parts for e in got if isinstance(e, Parts)]
    assert parts == [[Reasoning("x")], [Text("yz")]]  # "y" and "z": one part, one event
    (done,) = [e for e in got if isinstance(e, Done)]
    assert done.reasoning_tokens == 3  # <think>, x and </think>, as if each token came alone

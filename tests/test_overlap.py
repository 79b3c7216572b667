"""Overlapped decode steps (`[engine] overlap_steps`): while a model decodes, the leader
sends its next step before the running one's tokens return, and the worker feeds each sequence the
token it has just sampled. Nothing a client sees may change: the same text, the same usage, the
same stops, nothing held afterwards; only the device stops waiting for the leader."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import openai
import pytest

from cortex.engine.blocks import BlockManager
from cortex.engine.scheduler import Scheduler
from tests.conftest import Server, scrape, tiny_models_toml, value, wait_for
from tests.test_engine import _seq

# -- the plan: which steps may go ahead --------------------------------------------------------------


def _scheduler() -> Scheduler:
    return Scheduler(BlockManager(64, 4), max_batch_tokens=64, prefill_chunk=64, max_seqs=8)


def test_a_step_goes_ahead_of_the_one_in_flight_when_the_whole_batch_samples():
    sched, a, b = _scheduler(), _seq(6), _seq(3)
    sched.add(a)
    sched.add(b)
    first = sched.plan()  # both prompts, each sampling its first token
    ahead = sched.plan_ahead(first)
    assert [(w.seq, w.start, w.follows, w.samples) for w in ahead] == [(a, 6, True, True), (b, 3, True, True)]
    assert len(a.block_table) == 2 and len(b.block_table) == 1  # room for position 6 and 3 in advance
    sched.done(first)
    a.tokens.append(7)
    b.tokens.append(7)
    assert [w.start for w in sched.plan_ahead(ahead)] == [7, 4]  # and the one after, once the first returned


def test_no_step_goes_ahead_when_a_token_in_flight_decides_what_comes_next():
    sched, a = _scheduler(), _seq(6)
    sched.add(a)
    first = sched.plan()
    sched.add(_seq(9))
    assert sched.plan_ahead(first) == []  # a newcomer waits for a plan that admits it
    sched, a = _scheduler(), _seq(6, max_tokens=1)
    sched.add(a)
    assert sched.plan_ahead(sched.plan()) == []  # the token in flight is its last
    sched, a = _scheduler(), _seq(6)
    a.constraint = object()  # a grammar: the next mask depends on the token in flight
    sched.add(a)
    assert sched.plan_ahead(sched.plan()) == []
    sched, a, b = _scheduler(), _seq(6), _seq(200)
    sched.add(a)
    sched.add(b)
    assert sched.plan_ahead(sched.plan()) == []  # b's prompt is still being prefilled


# -- served: the same answers, whether steps overlap or not ----------------------------------------


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_qwen3):
    yield from tiny_servers(tmp_path_factory, tiny_qwen3, ["overlap_steps = true", "overlap_steps = false"])


def tiny_servers(tmp_path_factory, model_dir, engine_keys: list[str]) -> Iterator[list[Server]]:
    """One served tiny model per entry of ``engine_keys`` (more [engine] lines), all up at once."""
    made = []
    for i, keys in enumerate(engine_keys):
        root = tmp_path_factory.mktemp(f"engine-{i}")
        extra = f"[engine]\nkv_cache_mb = 8\nmax_requests_per_client = 0\n{keys}\n"
        made.append(Server(root, tiny_models_toml(model_dir, "max_context = 1024"), extra))
    try:
        for srv in made:
            srv.wait_healthy()
        yield made
    finally:
        for srv in made:
            srv.stop()


def _client(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _request(i: int) -> dict:
    words = ["Hello", "world", "Paris", "capital", "France", "today", "how", "are", "you"]
    content = " ".join(words[(i + k) % len(words)] for k in range(2 + 5 * i))
    sampled = {"temperature": 0.9, "seed": i, "extra_body": {"top_k": 40, "ignore_eos": True}}
    kw = {"temperature": 0, "extra_body": {"ignore_eos": True}} if i % 2 == 0 else sampled
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 1 + 3 * i, **kw}


def _answers(srv: Server, concurrent: bool) -> list[tuple]:
    client, got = _client(srv), {}

    def go(i: int) -> None:
        r = client.chat.completions.create(model="tiny", n=1 + i % 2, **_request(i))
        got[i] = ([c.message.content for c in r.choices], r.usage.completion_tokens, r.choices[0].finish_reason)

    if concurrent:
        threads = [threading.Thread(target=go, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    else:
        for i in range(10):
            go(i)
    return [got.get(i) for i in range(10)]


def _kv_used(srv: Server) -> float:
    return value(scrape(srv.metrics_url), "cortex_kv_cache_blocks", model="tiny", state="used")


def test_overlapped_steps_answer_exactly_what_steps_in_turn_answer(servers):
    on, off = servers
    expected = _answers(off, concurrent=False)
    assert _answers(on, concurrent=False) == expected
    assert _answers(on, concurrent=True) == expected  # batches that grow and shrink under it
    assert value(scrape(on.metrics_url), "cortex_overlapped_steps_total", model="tiny") > 0
    assert value(scrape(off.metrics_url), "cortex_overlapped_steps_total", model="tiny") == 0
    wait_for(lambda: _kv_used(on) == 0, what="every KV block free again")


def test_a_stream_stopped_by_a_stop_string_or_cancelled_ends_the_same_and_frees_its_blocks(servers):
    on, off = servers
    stops_and_cancels_as_the_reference_does(off, on, cancel_after=3)  # a step overlapped behind the running one


def stops_and_cancels_as_the_reference_does(reference: Server, srv: Server, cancel_after: int) -> None:
    """A stop string ends ``srv``'s answer where it ends ``reference``'s (greedy, the same text before
    it); a client that goes away mid-stream leaves no KV block held on ``srv``."""
    ask = {"model": "tiny", "max_tokens": 40, "temperature": 0, "extra_body": {"ignore_eos": True}}
    messages = [{"role": "user", "content": "Hello world"}]
    full = _client(reference).chat.completions.create(messages=messages, **ask).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    for one in (srv, reference):
        r = _client(one).chat.completions.create(messages=messages, stop=[stop], **ask)
        assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == full[: full.index(stop)]
    with _client(srv).chat.completions.create(messages=messages, stream=True, **ask) as stream:
        for i, _ in enumerate(stream):
            if i == cancel_after:
                break
    wait_for(lambda: _kv_used(srv) == 0, what="the cancelled stream's blocks free again")

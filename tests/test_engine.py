"""The engine under load: many sequences per step give what each gives alone; KV blocks are shared
by common prefixes and freed the moment nobody needs them; queues are bounded."""

from __future__ import annotations

import contextlib
import threading

import httpx
import openai
import pytest
import torch

from cortex.engine.blocks import BlockManager
from cortex.engine.scheduler import Scheduler
from cortex.engine.sequence import Sequence
from rpc.messages import SamplingParams
from tests.checkpoints import make_checkpoint
from tests.conftest import Server, scrape, tiny_models_toml, value, wait_for
from workers.arch import ModelConfig, model_class
from workers.kv_cache import LocalRunner, PagedKVCache, StepBatch
from workers.weights import load_weights

# -- the model: one batched step equals each sequence alone ------------------------------------------


def test_a_mixed_batch_gives_each_sequence_its_own_logits(tmp_path):
    path = make_checkpoint(tmp_path, "qwen3", tied=True)
    cfg = ModelConfig.from_hf_dir(path)
    model = model_class(cfg)(cfg)
    load_weights(model, "safetensors", [str(p) for p in path.glob("*.safetensors")])
    cpu = torch.device("cpu")
    prompts = [list(range(3, 3 + n)) for n in (5, 17, 40, 2)]

    alone = []  # each sequence by itself: prefill, then one decode token
    for p in prompts:
        run = LocalRunner(model, cpu)
        run.step(0, p, 0)
        alone.append(run.step(0, [7], len(p)))

    cache = PagedKVCache(*model.kv_shape(), cpu, num_blocks=32)
    tables = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    # step 1: sequences 0 and 1 prefill whole, 2 prefills its first 25 tokens, 3 waits
    model(
        StepBatch.build(
            [(prompts[0], 0, tables[0]), (prompts[1], 0, tables[1]), (prompts[2][:25], 0, tables[2])], 16, cpu
        ),
        cache,
    )
    # step 2: decodes of 0 and 1, the rest of 2's prompt, all of 3's
    batch = StepBatch.build(
        [
            ([7], len(prompts[0]), tables[0]),
            ([7], len(prompts[1]), tables[1]),
            (prompts[2][25:], 25, tables[2]),
            (prompts[3], 0, tables[3]),
        ],
        16,
        cpu,
    )
    mixed = model(batch, cache)
    for i in (0, 1):
        assert (mixed[i] - alone[i]).abs().max() < 1e-5
    # step 3: everyone decodes together
    last = model(
        StepBatch.build([([7], len(prompts[2]), tables[2]), ([7], len(prompts[3]), tables[3])], 16, cpu), cache
    )
    for j, i in enumerate((2, 3)):
        assert (last[j] - alone[i]).abs().max() < 1e-5


# -- blocks and scheduling ----------------------------------------------------------------------------


def test_prefix_blocks_are_shared_and_survive_until_reused():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = list(range(10))  # 2 full blocks + 2 tokens
    table, cached = bm.allocate_prompt(a)
    assert cached == 0 and len(table) == 3
    bm.register(table, a, 10, [])
    b = a[:8] + [99, 98, 97]  # same first two blocks
    table_b, cached_b = bm.allocate_prompt(b)
    assert cached_b == 8 and table_b[:2] == table[:2] and table_b[2] != table[2]
    assert bm.refs[table[0]] == 2
    bm.release(table)
    bm.release(table_b)
    assert bm.num_free == 8  # all free again, but the prefix is still cached
    again, cached_again = bm.allocate_prompt(a)
    assert cached_again == 8


def test_prompts_computed_side_by_side_leave_their_whole_shared_prefix_cached():
    """Two requests with the same start, admitted before either computed it, each fill blocks of
    their own. The first names its blocks; the second's later blocks hang off the first's named
    ones (same tokens, same KV), so a third prompt finds the whole shared prefix."""
    bm = BlockManager(num_blocks=16, block_size=4)
    a, b = list(range(9)), list(range(8)) + [50, 51, 52, 53, 54]  # b goes one block further
    (ta, _), (tb, _) = bm.allocate_prompt(a), bm.allocate_prompt(b)
    bm.register(ta, a, 9, [])
    bm.register(tb, b, 13, [])
    _, cached = bm.allocate_prompt(b + [60])
    assert cached == 12  # a's blocks 0-1, then b's block 2


def test_the_last_prompt_token_is_always_computed():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = list(range(8))  # exactly two full blocks
    table, _ = bm.allocate_prompt(a)
    bm.register(table, a, 8, [])
    _, cached = bm.allocate_prompt(a)
    assert cached == 4  # the second block holds the last token: computed anew, in a fresh block


def test_cached_blocks_are_reused_least_recently_freed_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    old, _ = bm.allocate_prompt([1, 2, 3])
    bm.register(old, [1, 2, 3], 3, [])
    bm.release(old)
    fresh, _ = bm.allocate_prompt([7, 8, 9, 10, 11, 12, 13])  # needs all 4 blocks: evicts the cache
    assert len(fresh) == 4 and not bm.by_digest
    assert bm.allocate_prompt([5]) is None  # nothing left


def test_a_block_is_named_by_a_strong_digest_of_its_prefix_tokens_and_namespace():
    a, b = BlockManager(8, 4, namespace="model-a"), BlockManager(8, 4, namespace="model-b")
    tokens = list(range(12))
    assert a.chain(tokens) == a.chain(tokens) and len(a.chain(tokens)) == 3
    assert all(len(d) == 16 for d in a.chain(tokens))  # 128 bits
    assert a.chain(tokens) != b.chain(tokens)  # another model's KV is another thing
    assert a.chain([9, 9, 9, 9] + tokens[4:])[1] != a.chain(tokens)[1]  # same block, other prefix


def test_prompts_share_cached_blocks_only_within_their_cache_salt(monkeypatch):
    """Tenants that send different ``cache_salt``s never share a block; the same salt does. Even
    with every digest colliding, a hit checks the salt."""
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(13))
    table, _ = bm.allocate_prompt(prompt, salt=b"tenant-a")
    bm.register(table, prompt, 13, [], b"tenant-a")
    bm.release(table)
    assert bm.allocate_prompt(prompt, salt=b"tenant-b")[1] == 0
    assert bm.allocate_prompt(prompt)[1] == 0  # no salt is a salt of its own
    assert bm.allocate_prompt(prompt, salt=b"tenant-a")[1] == 12
    assert bm.chain(prompt, salt=b"tenant-a") != bm.chain(prompt, salt=b"tenant-b")

    from cortex.engine import blocks

    monkeypatch.setattr(blocks, "block_digest", lambda parent, tokens, namespace: b"\0" * 16)
    bm = BlockManager(num_blocks=8, block_size=4)
    table, _ = bm.allocate_prompt(prompt[:9], salt=b"tenant-a")
    bm.register(table, prompt[:9], 9, [], b"tenant-a")
    bm.release(table)
    assert bm.allocate_prompt(prompt[:9], salt=b"tenant-b")[1] == 0


def test_a_forced_digest_collision_never_serves_another_prompts_kv(monkeypatch):
    from cortex.engine import blocks

    monkeypatch.setattr(blocks, "block_digest", lambda parent, tokens, namespace: b"\0" * 16)
    bm = BlockManager(num_blocks=8, block_size=4)
    a = list(range(9))
    table, _ = bm.allocate_prompt(a)
    bm.register(table, a, 9, [])
    bm.release(table)
    other = [50, 51, 52, 53, 4, 5, 6, 7, 8]  # every digest collides with a's
    _, cached = bm.allocate_prompt(other)
    assert cached == 0


def test_a_cached_block_loses_its_name_when_the_block_before_it_is_overwritten(monkeypatch):
    """With digests that ignore the prefix (a collision on every later block), a block whose
    parent's slot now holds other tokens must not be matched through that slot. (Freeing tail
    first overwrites children before parents; this holds whatever the order.)"""
    from cortex.engine import blocks

    real = blocks.block_digest
    monkeypatch.setattr(blocks, "block_digest", lambda parent, tokens, namespace: real(b"", tokens, namespace))
    bm = BlockManager(num_blocks=3, block_size=2)
    first = [1, 2, 3, 4, 0]  # blocks X = [1, 2] and T = [3, 4], then the last token's
    table, _ = bm.allocate_prompt(first)
    bm.register(table, first, 4, [])
    x_block, t_block, tail = table
    bm.release(table)
    bm.free.move_to_end(tail)
    bm.free.move_to_end(t_block)  # X's slot goes first, T's last
    z = [7, 8, 0]
    z_table, _ = bm.allocate_prompt(z)
    assert z_table[0] == x_block and t_block not in z_table
    bm.register(z_table, z, 2, [])  # X's slot now holds [7, 8], and is named for it
    bm.release(z_table)
    _, cached = bm.allocate_prompt([7, 8, 3, 4, 0])  # [7, 8] matches; T was computed after [1, 2]
    assert cached == 2


def test_the_request_table_answers_by_request_model_client_and_seq_id():
    from cortex.engine.requests import RequestTable

    def seq(rid, index=0, model="m", client="k1"):
        return Sequence(rid, b"", model, 3, [1, 2, 3], SamplingParams(), 10, None, frozenset(), client, index)

    table = RequestTable()
    a0, a1, b0, c0 = seq("a"), seq("a", 1), seq("b", model="x"), seq("c", client="k2")
    for s in (a0, a1, b0, c0):
        table.add(s)
    with pytest.raises(ValueError):
        table.add(seq("a", 1))  # one sequence per choice
    assert table.first("a") is a0 and table.choices("a") == [a0, a1] and table.choices("zz") == []
    assert set(map(id, table.of_model("m"))) == {id(a0), id(a1), id(c0)} and table.has_model("x")
    assert table.requests_of("k1") == 2 and table.requests_of("k2") == 1  # requests, not choices
    assert table.by_seq_id(b0.seq_id) is b0 and len(table) == 4 and table.request_count == 3
    assert table.remove(a0) and not table.remove(a0) and a0 not in table
    assert table.requests_of("k1") == 2 and table.first("a") is a1  # a's second choice still runs
    assert table.remove(a1) and table.requests_of("k1") == 1 and not table.has_request("a")
    assert table.remove(b0) and not table.has_model("x") and list(table) == [c0]


def _seq(n_prompt: int, max_tokens: int = 100) -> Sequence:
    from tokenizers import Tokenizer, models

    from cortex.chat.detokenizer import IncrementalDecoder
    from tests.conftest import SPECIALS  # noqa: F401  (keeps the tokenizer fixture's import light)

    tok = Tokenizer(models.BPE())
    return Sequence(
        request_id=f"r{n_prompt}",
        peer=b"",
        model_id="m",
        prompt_len=n_prompt,
        tokens=list(range(n_prompt)),
        sampling=SamplingParams(),
        max_tokens=max_tokens,
        decoder=IncrementalDecoder(tok),
        eos_ids=frozenset(),
    )


def test_scheduler_decodes_first_then_chunks_prompts_within_the_budget():
    sched = Scheduler(BlockManager(64, 16), max_batch_tokens=40, prefill_chunk=16, max_seqs=8)
    short, long_ = _seq(10), _seq(100)
    sched.add(short)
    sched.add(long_)
    work = sched.plan()
    assert [(w.seq, len(w.tokens)) for w in work] == [(short, 10), (long_, 16)]  # chunked at 16
    sched.done(work)
    short.tokens.append(5)  # short sampled its first token
    work = sched.plan()
    assert work[0].seq is short and work[0].tokens == [5] and work[0].start == 10  # its decode comes first
    assert work[1].seq is long_ and work[1].start == 16 and len(work[1].tokens) == 16
    assert sum(len(w.tokens) for w in work) <= 40


def decode_until_preempted(sched: Scheduler, steps: int = 8) -> None:
    """Run steps (every sampled token a 1) until the pool runs out and a sequence is preempted."""
    for _ in range(steps):
        work = sched.plan()
        sched.done(work)
        for w in work:
            if w.samples:
                w.seq.tokens.append(1)
        if sched.preemptions:
            return


def test_scheduler_preempts_the_newest_when_the_pool_is_full_and_recomputes_it():
    sched = Scheduler(BlockManager(3, 4), max_batch_tokens=64, prefill_chunk=64, max_seqs=8)
    a, b = _seq(4), _seq(3)
    sched.add(a)
    sched.add(b)
    work = sched.plan()  # a takes 1 block, b takes 1 (1 left in reserve)
    sched.done(work)
    a.tokens.append(1)
    b.tokens.append(1)
    decode_until_preempted(sched)
    assert sched.preemptions == 1 and b in sched.waiting and b.computed == 0 and not b.block_table
    assert a in sched.running


# -- the server under load ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_server(tmp_path_factory, tiny_qwen3):
    root = tmp_path_factory.mktemp("engine")
    extra = (
        "[engine]\nprefill_chunk = 24\nmax_batch_tokens = 64\nmax_seqs = 16\nkv_cache_mb = 8\n"
        "max_requests_per_client = 0\n"
    )
    srv = Server(root, tiny_models_toml(tiny_qwen3, "max_context = 1024"), extra)
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _request(i: int) -> dict:
    words = ["Hello", "world", "Paris", "capital", "France", "today", "how", "are", "you"]
    content = " ".join(words[(i + k) % len(words)] for k in range(3 + 7 * i))  # different lengths
    kw = (
        {"temperature": 0} if i % 2 == 0 else {"temperature": 0.9, "top_p": 0.9, "seed": i, "extra_body": {"top_k": 50}}
    )
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 12 + i, **kw}


def test_16_concurrent_requests_each_get_what_they_get_alone(engine_server):
    client = _client(engine_server)
    alone = [client.chat.completions.create(model="tiny", **_request(i)).choices[0].message.content for i in range(16)]
    together: dict[int, str] = {}
    errors = []

    def go(i):
        try:
            together[i] = client.chat.completions.create(model="tiny", **_request(i)).choices[0].message.content
        except Exception as exc:  # asserted below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert [together[i] for i in range(16)] == alone


def test_a_repeated_prompt_reuses_its_cached_prefix(engine_server):
    client = _client(engine_server)
    messages = [{"role": "user", "content": "Hello world " * 60}]
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    second = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0 or first.usage.prompt_tokens > 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= ((second.usage.prompt_tokens - 1) // 16) * 16 > 0
    assert second.choices[0].message.content == first.choices[0].message.content


def _engine_stats(srv) -> dict:
    return srv.health()["models"][0]["engine"]


HI = [{"role": "user", "content": "Hi"}]


def _assert_cut_short(srv, max_tokens: int) -> None:
    """The one request this server ran was cancelled in decode, well before its ``max_tokens``:
    what "at once" means, told by the server's own counters rather than by a clock."""
    samples = scrape(srv.metrics_url)
    assert value(samples, "cortex_cancellations_total", stage="decode") == 1
    assert 0 < value(samples, "cortex_generation_tokens_total") < max_tokens / 2


@pytest.mark.slow
def test_a_disconnected_stream_frees_its_kv_at_once(tmp_path, tiny_qwen3):
    # 20 ms per step: a generation outlives the moment its client leaves
    srv = Server(tmp_path, tiny_models_toml(tiny_qwen3), env={"CORTEX_TEST_STEP_DELAY_S": "0.02"})
    try:
        srv.wait_healthy()
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 1000,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()  # held: a dropped line iterator closes the connection at once
            for n, _ in enumerate(lines):
                if n > 20:
                    break
            stats = _engine_stats(srv)
            assert stats["running"] == 1 and stats["kv_blocks_used"] > 0
        # the client is gone: its slot is freed
        wait_for(lambda: not _engine_stats(srv)["kv_blocks_used"], what="the stream's KV blocks to be freed")
        assert _engine_stats(srv)["running"] == 0
        _assert_cut_short(srv, max_tokens=1000)
    finally:
        srv.stop()


def test_a_slow_reader_loses_no_tokens(engine_server):
    import json

    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 900,
        "ignore_eos": True,
        "temperature": 0,
    }
    whole = httpx.post(engine_server.url + "/v1/chat/completions", json=body, timeout=300).json()
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", engine_server.url + "/v1/chat/completions", json=stream_body, timeout=60) as r:
        assert r.status_code == 200
        # the engine finishes long before we read anything
        wait_for(lambda: not _engine_stats(engine_server)["running"], what="the generation to finish")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert events[-1]["usage"]["completion_tokens"] == 900


@pytest.mark.slow
def test_a_full_queue_answers_503_with_retry_after(tmp_path, tiny_qwen3):
    extra = "[engine]\nmax_seqs = 1\nmax_waiting = 2\nmax_requests_per_client = 0\n"
    # 20 ms per step: the first request runs for 20 s or more, until the test lets it go
    srv = Server(tmp_path, tiny_models_toml(tiny_qwen3), extra, env={"CORTEX_TEST_STEP_DELAY_S": "0.02"})
    try:
        srv.wait_healthy()
        first_body = {"model": "tiny", "messages": HI, "max_tokens": 1000, "ignore_eos": True, "stream": True}
        body = {"model": "tiny", "messages": HI, "max_tokens": 2}
        statuses, retry = [], []

        def go():
            r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=300)
            statuses.append(r.status_code)
            if r.status_code == 503:
                retry.append(r.headers.get("retry-after"))

        # One request is running before the burst, so the burst meets a full batch: two of it
        # wait in the queue, the other five are refused at once.
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=first_body, timeout=300) as first:
            assert first.status_code == 200
            lines = first.iter_lines()
            next(lines)
            wait_for(lambda: _engine_stats(srv)["running"] == 1, what="the first request to run")
            threads = [threading.Thread(target=go) for _ in range(7)]
            for t in threads:
                t.start()
            wait_for(lambda: len(statuses) == 5, what="five refusals")
        # the first request is gone (cancelled): the two queued ones run
        for t in threads:
            t.join(300)
        assert sorted(statuses) == [200, 200, 503, 503, 503, 503, 503]
        assert all(r and int(r) >= 1 for r in retry)
    finally:
        srv.stop()


def test_one_client_over_its_limit_gets_429(tmp_path, tiny_qwen3):
    # 20 ms per step: the two streams run for 8 s or more, until the test closes them
    extra = "[engine]\nmax_requests_per_client = 2\n"
    srv = Server(tmp_path, tiny_models_toml(tiny_qwen3), extra, env={"CORTEX_TEST_STEP_DELAY_S": "0.02"})
    try:
        srv.wait_healthy()
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 400,
            "ignore_eos": True,
            "stream": True,
        }
        streams = [
            httpx.stream(
                "POST", srv.url + "/v1/chat/completions", json=body, timeout=60, headers={"Authorization": "Bearer k1"}
            )
            for _ in range(2)
        ]
        opened = [s.__enter__() for s in streams]
        try:
            wait_for(lambda: _engine_stats(srv)["running"] == 2, what="both streams to run")
            r = httpx.post(
                srv.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer k1"}, timeout=60
            )
            assert r.status_code == 429 and r.headers["retry-after"]
            assert r.json()["error"]["type"] == "rate_limit_error"
            other = httpx.post(
                srv.url + "/v1/chat/completions",
                json={**body, "stream": False, "max_tokens": 2},
                headers={"Authorization": "Bearer k2"},
                timeout=60,
            )
            assert other.status_code == 200  # another client is not affected
        finally:
            for s, o in zip(streams, opened, strict=True):
                o.close()
                s.__exit__(None, None, None)
    finally:
        srv.stop()


def test_a_client_that_hangs_up_on_a_non_streamed_request_cancels_it(tmp_path, tiny_qwen3):
    import socket

    srv = Server(tmp_path, tiny_models_toml(tiny_qwen3), env={"CORTEX_TEST_STEP_DELAY_S": "0.02"})
    try:
        srv.wait_healthy()
        body = b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1000, "ignore_eos": true}'
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            wait_for(lambda: _engine_stats(srv)["running"], what="the request to run")
            assert _engine_stats(srv)["kv_blocks_used"] > 0
        # hung up, 20 s or more of generation before it
        wait_for(lambda: not _engine_stats(srv)["running"], what="the request to stop")
        assert _engine_stats(srv)["kv_blocks_used"] == 0
        _assert_cut_short(srv, max_tokens=1000)
    finally:
        srv.stop()


def test_the_kv_pool_is_float16_on_the_cpu_by_default(engine_server, tiny_qwen3):
    """kv_cache_dtype = "auto": a float32 model on the CPU keeps keys and values as float16, so
    its kv_cache_mb holds twice the blocks it would in float32."""
    from workers.sharding import kv_block_bytes

    cfg = ModelConfig.from_hf_dir(tiny_qwen3)
    engine = httpx.get(engine_server.url + "/health", timeout=30).json()["models"][0]["engine"]
    assert engine["kv_dtype"] == "float16"  # operators see what the pool holds
    assert engine["kv_blocks_total"] == 8 * 2**20 // kv_block_bytes(cfg, 1, "float16")
    assert kv_block_bytes(cfg, 1, "float16") * 2 == kv_block_bytes(cfg, 1, "float32")


# A chat template that takes a long time (a second or so of Jinja loops) for the message "slow" only
SLOW_TEMPLATE = (
    '{%- if messages[-1].content == "slow" %}{% for i in range(100000) %}{% for j in range(40) %}'
    "{% endfor %}{% endfor %}{% endif -%}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_slow_prompt_does_not_stall_the_running_streams(tmp_path, tiny_qwen3):
    """Prompts are rendered, tokenized and compiled off the leader's loop: while one request's
    chat template takes a long time, a running stream keeps getting tokens. (Rendered on the loop,
    it got none until the template was done.)"""
    (tmp_path / "slow.jinja").write_text(SLOW_TEMPLATE)
    models = tiny_models_toml(tiny_qwen3, 'chat_template = "slow.jinja"')
    srv = Server(tmp_path, models, env={"CORTEX_TEST_STEP_DELAY_S": "0.02"})
    try:
        srv.wait_healthy()
        # 2,000 steps of 20 ms or more: the stream outlasts the slow prompt (it is cancelled after it)
        body = {"model": "tiny", "messages": HI, "max_tokens": 2000, "ignore_eos": True, "stream": True}
        received: list[str] = []
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=300) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for n, _ in enumerate(line for line in lines if '"content":"' in line):
                if n == 3:  # the stream is generating
                    break

            def read() -> None:
                with contextlib.suppress(httpx.HTTPError):
                    for line in lines:
                        received.append(line)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            before = len(received)
            slow = httpx.post(
                srv.url + "/v1/chat/completions",
                json={"model": "tiny", "messages": [{"role": "user", "content": "slow"}], "max_tokens": 1},
                timeout=300,
            )
            during = len(received) - before
        assert slow.status_code == 200, slow.text
        assert during >= 10, f"the stream got {during} lines while the slow prompt was prepared"
    finally:
        srv.stop()

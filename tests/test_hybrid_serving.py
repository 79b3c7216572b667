"""Qwen3.5 hybrid models served end to end: a real `cortex serve` with a tiny random Qwen3.5
(linear-attention layers with a recurrent state per sequence, workers/arch/qwen3_5.py).

The engine gives each running sequence a state slot (it waits in the queue while none is free),
frees it when the sequence ends; a prefix is reused only where a recurrent state was saved
(tests/test_hybrid_prefix_cache.py), and a preempted sequence restarts from the last saved state
or position 0. Greedy text is compared with transformers' own greedy choice on the same prompt ids,
token by token (their bytes, from the response's logprobs).
"""

from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest
import torch

from cortex.chat import prompt as chat_prompt
from cortex.chat.tokenizer import token_bytes
from cortex.engine.blocks import BlockManager
from cortex.engine.scheduler import Scheduler
from cortex.models.source import _read_hf_dir
from tests.checkpoints import hf_hybrid_model, make_hybrid_checkpoint, write_chatml_tokenizer_config
from tests.conftest import Server, tiny_models_toml, train_tiny_tokenizer, wait_for
from tests.test_engine import _seq, decode_until_preempted

SLOTS = 2  # [engine] max_seqs: the state slots of the model
CHUNK = 16  # [engine] prefill_chunk: the longer prompts below are prefilled in several chunks
SENTENCE = "The capital of France is Paris. "


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-qwen3_5")
    make_hybrid_checkpoint(d)
    train_tiny_tokenizer(d)
    write_chatml_tokenizer_config(d)
    return d


@pytest.fixture(scope="module")
def srv(tmp_path_factory, hybrid_dir, tiny_qwen3):
    extra = (
        f'[engine]\nmax_seqs = {SLOTS}\nprefill_chunk = {CHUNK}\nkv_cache_mb = 8\nkv_cache_dtype = "float32"\n'
        "step_target_ms = 0\nmax_requests_per_client = 0\n"
    )
    # 10 ms per step: a long stream is still running when the test cancels it
    server = Server(
        tmp_path_factory.mktemp("hybrid-srv"),
        # a plain Qwen3 beside it: the two models' steps take turns on the same worker
        tiny_models_toml(hybrid_dir, "max_context = 512", model_id="hybrid")
        + f'\n[[models]]\nid = "dense"\npath = "{tiny_qwen3}"\npreload = true\n',
        extra,
        env={"CORTEX_TEST_STEP_DELAY_S": "0.01"},
    )
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


def _chat(srv, content: str, max_tokens: int = 12, model: str = "hybrid", **kw) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": True,
        **kw,
    }
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def _token_bytes(choice: dict) -> list[bytes]:
    return [bytes(t["bytes"]) for t in choice["logprobs"]["content"]]


def _engine(srv) -> dict:
    return _model(srv)["engine"]


def _model(srv, model_id: str = "hybrid") -> dict:
    return next(m for m in srv.health()["models"] if m["id"] == model_id)


def test_greedy_chat_equals_transformers_greedy_on_the_same_prompt_ids(srv, hybrid_dir):
    files = _read_hf_dir(hybrid_dir)
    ref = hf_hybrid_model(hybrid_dir)
    limit = files.tokenizer.vocab_size  # ids past the tokenizer's are never sampled
    for content, steps in (("Hi", 12), (SENTENCE * 3, 8)):  # the second prompt is prefilled in chunks
        ids = files.tokenizer.encode(
            chat_prompt.render(files.template, [{"role": "user", "content": content}], None, None)
        )
        got = _chat(srv, content, steps)
        assert got["usage"]["prompt_tokens"] == len(ids)
        assert content == "Hi" or len(ids) > 2 * CHUNK
        want, seq = [], list(ids)
        with torch.no_grad():
            for _ in range(steps):
                token = int(ref(torch.tensor([seq])).logits[0, -1, :limit].argmax())
                want.append(token)
                seq.append(token)
        tok = files.tokenizer.tokenizer
        assert _token_bytes(got["choices"][0]) == [token_bytes(tok, t) for t in want]


def test_concurrent_streams_each_equal_the_same_request_alone_and_queue_for_slots(srv):
    """More requests than state slots at once: they queue for slots and all complete; each one's
    text equals its text alone, whatever it shared steps with (prompts longer than a chunk carry
    their state from chunk to chunk)."""
    prompts = ["Hi", SENTENCE, SENTENCE * 2 + "Hello", SENTENCE * 4, "How are you today?"]
    alone = [_chat(srv, p, 10)["choices"][0] for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: _chat(srv, p, 10)["choices"][0], prompts))
    for a, b in zip(alone, together, strict=True):
        assert b["message"]["content"] == a["message"]["content"]
        assert _token_bytes(b) == _token_bytes(a)
    wait_for(lambda: _engine(srv)["running"] == 0, what="every sequence to end")
    engine = _engine(srv)
    assert engine["state_slots_total"] == SLOTS and engine["state_slots_used"] == 0


def test_hybrid_and_plain_models_stepping_by_turns_each_answer_what_they_answer_alone(srv):
    """Requests for the hybrid model and for a plain Qwen3 at once, on the same worker: each one's
    greedy tokens equal its own alone (the hybrid's states and the other's KV never mix)."""
    asks = [("hybrid", SENTENCE * 2 + "Mixed."), ("dense", "Hi"), ("hybrid", "Hi"), ("dense", SENTENCE * 3)]
    alone = [_chat(srv, p, 10, model=m)["choices"][0] for m, p in asks]
    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(lambda a: _chat(srv, a[1], 10, model=a[0])["choices"][0], asks))
    for a, b in zip(alone, together, strict=True):
        assert _token_bytes(b) == _token_bytes(a)


def test_n_choices_agree_when_greedy(srv):
    """The second choice resumes from the first's saved prompt state (the scheduler test shows it
    waits for it); both equal the prompt alone."""
    prompt = "Tell me twice. " + SENTENCE * 2  # a start no earlier test sent
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    got = client.chat.completions.create(
        model="hybrid",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=8,
        temperature=0,
        n=2,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    one = _chat(srv, prompt, 8)
    assert got.usage.prompt_tokens_details.cached_tokens == 0  # the first choice computed it
    assert one["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16  # the resend resumes
    assert len(got.choices) == 2
    for choice in got.choices:
        assert [bytes(t.bytes) for t in choice.logprobs.content] == _token_bytes(one["choices"][0])


def test_the_next_turn_of_a_conversation_resumes_from_the_saved_state_and_equals_transformers(srv, hybrid_dir):
    """An agent resends the whole conversation every turn: the second turn reuses the first turn's
    prompt (its KV blocks and the recurrent state saved at its last block boundary), reports those
    tokens as cached, and its greedy tokens are still transformers' on the whole prompt."""
    files = _read_hf_dir(hybrid_dir)
    first = [{"role": "user", "content": SENTENCE * 3 + "What is the capital?"}]
    reply = _chat(srv, first[0]["content"], 6)
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    turn2 = [*first, {"role": "assistant", "content": reply["choices"][0]["message"]["content"]}]
    turn2.append({"role": "user", "content": "And of Italy?"})
    body = {"model": "hybrid", "messages": turn2, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    r = httpx.post(srv.url + "/v1/chat/completions", json={**body, "logprobs": True}, timeout=300)
    assert r.status_code == 200, r.text
    got = r.json()
    first_len = reply["usage"]["prompt_tokens"]
    assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == ((first_len - 1) // 16) * 16
    assert _engine(srv)["state_checkpoints_used"] >= 1
    ids = files.tokenizer.encode(chat_prompt.render(files.template, turn2, None, None))
    ref, limit, want, seq = hf_hybrid_model(hybrid_dir), files.tokenizer.vocab_size, [], list(ids)
    with torch.no_grad():
        for _ in range(6):
            token = int(ref(torch.tensor([seq])).logits[0, -1, :limit].argmax())
            want.append(token)
            seq.append(token)
    assert _token_bytes(got["choices"][0]) == [token_bytes(files.tokenizer.tokenizer, t) for t in want]


def test_a_cancelled_stream_frees_its_slot(srv):
    body = {
        "model": "hybrid",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 450,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert _engine(srv)["state_slots_used"] >= 1
    wait_for(lambda: _model(srv)["in_flight"] == 0, what="the cancelled stream to go")
    engine = _engine(srv)
    assert engine["running"] == 0 and engine["state_slots_used"] == 0 and engine["kv_blocks_used"] == 0
    for _ in range(SLOTS + 1):  # every slot can be taken again
        assert _chat(srv, "Hi", 3)["choices"][0]["finish_reason"] == "length"


# -- the scheduler's slots, without a server ----------------------------------------------------------


def test_scheduler_gives_each_running_sequence_a_slot_and_queues_the_rest():
    sched = Scheduler(BlockManager(64, 4, prefix_cache=False), 64, 64, max_seqs=8, state_slots=2)
    a, b, c = _seq(5), _seq(6), _seq(7)
    for s in (a, b, c):
        sched.add(s)
    work = sched.plan()
    assert [w.seq for w in work] == [a, b] and c in sched.waiting  # no third slot
    assert {a.state_slot, b.state_slot} == {0, 1}
    sched.done(work)
    sched.remove(a)  # finished: its slot goes to c, which starts at position 0
    assert a.state_slot == -1
    work = sched.plan()
    c_work = next(w for w in work if w.seq is c)
    assert c.state_slot == 0 and c_work.start == 0 and c.cached_tokens == 0


def test_a_preempted_hybrid_sequence_gives_back_its_slot_and_restarts_at_zero():
    sched = Scheduler(BlockManager(3, 4, prefix_cache=False), 64, 64, max_seqs=8, state_slots=2)
    a, b = _seq(4), _seq(3)
    sched.add(a)
    sched.add(b)
    sched.done(sched.plan())
    a.tokens.append(1)
    b.tokens.append(1)
    decode_until_preempted(sched)
    assert sched.preemptions == 1 and b in sched.waiting and b.state_slot == -1 and b.computed == 0
    assert sched.free_slots == [b_slot for b_slot in range(2) if b_slot != a.state_slot]


def test_no_prefix_is_cached_without_saved_states():
    bm = BlockManager(16, 4, prefix_cache=False)
    tokens = list(range(12))
    table, computed = bm.allocate_prompt(tokens)
    digests: list[bytes] = []
    bm.register(table, tokens, 12, digests)
    bm.release(table)
    assert bm.num_cached == 0 and bm.allocate_prompt(tokens)[1] == 0


def test_memory_estimates_count_full_attention_kv_deltanet_weights_and_state_slots(hybrid_dir):
    from cortex.models.memory import weight_bytes
    from workers.arch import ModelConfig, model_class
    from workers.sharding import ShardingError, check_split, kv_block_bytes

    cfg = ModelConfig.from_hf_dir(hybrid_dir)
    model = model_class(cfg)(cfg)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert abs(weight_bytes(cfg, 1, "float32") - params) < 0.01 * params
    layers, kv_heads, head_dim, _ = model.kv_shape()
    assert kv_block_bytes(cfg, 1, "float32") == 2 * layers * kv_heads * head_dim * 16 * 4 and layers == cfg.kv_layers
    pool = model.new_state_pool(3, torch.device("cpu"))
    assert pool.conv.nbytes + pool.delta.nbytes == 3 * cfg.state_slot_bytes(1, "float32")
    check_split(cfg, 2, "hybrid")  # 2 key heads: two ranks of one group each
    with pytest.raises(ShardingError, match="linear_num_key_heads"):
        check_split(cfg, 4, "hybrid")

"""Anthropic Messages as Claude Code uses them (issue 21 point 1), against a real `cortex serve` of a
tiny random Qwen3 stretched to a 32k context (API keys on): Anthropic's exact context-overflow texts,
system entries among the messages, the billing-header system block, ``x-should-retry: false`` on
final errors, ``request-id``, thinking settings, forced and single tool calls, usage that agrees
across stream events, and the Anthropic-shaped model list.

A random model writes nonsense, so what is checked is the shape of what comes back, and, where the
prompt matters, the prompt's token count (count_tokens) and the prefix cache.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import anthropic
import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer

from tests.checkpoints import make_checkpoint, write_chatml_tokenizer_config
from tests.conftest import Server, json_events, read_sse, tiny_models_toml, train_tiny_tokenizer

KEY = "sk-claude-code-test"
CONTEXT = 32768
HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
UNIT = {  # an argument a random model cannot make long: the call always closes
    "type": "object",
    "properties": {"unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["unit"],
}
TOOLS = [{"name": f"tool_{i}", "description": f"Tool number {i}", "input_schema": UNIT} for i in range(22)]
SYSTEM = "You are a careful coding agent. " * 12  # long enough to fill whole KV blocks of the cache
ASK = [{"role": "user", "content": "Read the file and fix the bug."}]


# a tiny model that opens its own <think> span and never closes it: x after x, y after a blank line
OPENS_THINK = [("\n", "<think>"), ("<think>", "x"), ("x", "x"), ("\n\n", "y"), ("y", "y")]


def write_bigram_model(path: Path, chain: list[tuple[str, str]]) -> None:
    """A tiny Qwen3 whose next token follows from its last one alone, whatever the seed: for each
    (last, next) of ``chain``, ``next`` by a margin of 80 logits (attention and MLP outputs are zero,
    each of those last tokens has an embedding dimension of its own, the head reads it). A stock
    ChatML template: the generation prompt ends with the assistant's line. ``<think>``, ``</think>``
    and a blank line are single tokens, as in Qwen3's vocabulary."""
    make_checkpoint(path, "qwen3", tied=False)
    train_tiny_tokenizer(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_tokens([AddedToken(t, normalized=False) for t in ("<think>", "</think>", "\n\n")])
    tok.save(str(path / "tokenizer.json"))
    write_chatml_tokenizer_config(path)
    weights = load_file(path / "model.safetensors")
    for name, w in weights.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w.zero_()
        elif name.endswith("norm.weight"):
            w.fill_(1.0)
    embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    embed.zero_()
    embed[:, 0] = 1.0  # any other token: flat logits
    head.zero_()
    for dim, (last, following) in enumerate(chain, start=1):
        (last_id,), (following_id,) = (tok.encode(t, add_special_tokens=False).ids for t in (last, following))
        embed[last_id] = torch.nn.functional.one_hot(torch.tensor(dim), embed.shape[1]).float()
        head[following_id, dim] = 10.0
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_qwen3):
    root = tmp_path_factory.mktemp("claude-code")
    model = root / "model"
    shutil.copytree(tiny_qwen3, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": CONTEXT}))
    (root / "keys").write_text(f"{KEY}\n")
    (root / "think.jinja").write_text((Path(__file__).parent / "templates" / "think.jinja").read_text())
    think = f'[[models]]\nid = "tiny-think"\npath = "{model}"\nchat_template = "think.jinja"\npreload = true\n'
    write_bigram_model(root / "opens", OPENS_THINK)
    think += f'[[models]]\nid = "tiny-opens"\npath = "{root / "opens"}"\npreload = true\n'
    srv = Server(
        root, think + tiny_models_toml(model, f"max_context = {CONTEXT}"), 'api_key_file = "keys"\nmax_body_mb = 1\n'
    )
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def post(server: Server, body: dict, path: str = "/v1/messages", **kw) -> httpx.Response:
    return httpx.post(
        server.url + path, json={"model": "tiny", **body}, headers=kw.pop("headers", HEADERS), timeout=120
    )


def count(server: Server, body: dict) -> int:
    r = post(server, body, "/v1/messages/count_tokens")
    assert r.status_code == 200, r.text
    return r.json()["input_tokens"]


def test_context_overflow_in_anthropic_words(server, claude):
    long = [{"role": "user", "content": " ".join(str(i) for i in range(12000))}]
    n = count(server, {"messages": long})
    assert n > CONTEXT
    r = post(server, {"messages": long, "max_tokens": 10})
    assert r.status_code == 400 and r.headers["x-should-retry"] == "false"
    assert r.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": f"prompt is too long: {n} tokens > {CONTEXT} maximum"},
    }
    prompt = {"system": SYSTEM, "messages": ASK, "tools": TOOLS}  # Claude Code's: long, with many tools
    p = count(server, prompt)
    assert p + 32000 > CONTEXT
    r = post(server, {**prompt, "max_tokens": 32000, "stream": True})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (
        f"input length and `max_tokens` exceed context limit: {p} + 32000 > {CONTEXT}, "
        "decrease input length or `max_tokens` and try again"
    )
    with pytest.raises(anthropic.BadRequestError) as e:  # what Claude Code's SDK reads
        claude.messages.create(model="tiny", max_tokens=32000, **prompt)
    assert re.fullmatch(
        r"input length and `max_tokens` exceed context limit: \d+ \+ 32000 > \d+, .*", e.value.body["error"]["message"]
    )
    # Claude Code retries with what is left: that succeeds
    m = claude.messages.create(model="tiny", max_tokens=min(CONTEXT - p, 8), **prompt)
    assert m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0) == p
    # the OpenAI dialect keeps OpenAI's words
    r = post(server, {"messages": long, "max_tokens": 10}, "/v1/chat/completions")
    assert r.status_code == 400 and f"maximum context length is {CONTEXT} tokens" in r.json()["error"]["message"]


def test_system_entries_among_messages_join_the_system_prompt(server, claude):
    turns = [*ASK, {"role": "assistant", "content": "Which file?"}, {"role": "user", "content": "main.py"}]
    mid = [*turns[:2], {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, turns[2]]
    folded = count(server, {"system": "Rules.\n\nBe brief.", "messages": turns})
    assert count(server, {"system": "Rules.", "messages": mid}) == folded
    assert count(server, {"messages": [{"role": "system", "content": "Rules."}, *mid]}) == folded
    m = claude.messages.create(model="tiny", max_tokens=4, system="Rules.", messages=mid)
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == folded
    r = post(server, {"max_tokens": 2, "messages": [*ASK, {"role": "system", "content": [{"type": "tool_use"}]}]})
    assert r.status_code == 400 and "messages.1.content" in r.json()["error"]["message"]


def billing(version: str) -> dict:
    return {"type": "text", "text": f"x-anthropic-billing-header: cc_version={version}; cc_entrypoint=cli;"}


def test_billing_header_block_is_dropped_and_the_prefix_cache_hits(server):
    system = [billing("1.0.1"), {"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
    assert count(server, {"system": system, "messages": ASK}) == count(server, {"system": SYSTEM, "messages": ASK})
    first = post(server, {"system": system, "messages": ASK, "max_tokens": 2})
    assert first.status_code == 200, first.text
    system[0] = billing("1.0.2")
    second = post(server, {"system": system, "messages": ASK, "max_tokens": 2})
    usage = second.json()["usage"]
    assert usage["cache_read_input_tokens"] >= 16 * (count(server, {"system": SYSTEM, "messages": ASK}) // 16) - 16


def test_final_errors_say_do_not_retry_and_every_response_has_a_request_id(server):
    wrong = post(server, {"messages": ASK, "max_tokens": 2}, headers={"x-api-key": "nope"})
    assert wrong.status_code == 401 and wrong.headers["x-should-retry"] == "false"
    assert wrong.json()["error"]["type"] == "authentication_error"
    unknown = post(server, {"messages": ASK, "max_tokens": 2, "model": "no-such-model"})
    assert unknown.status_code == 404 and unknown.headers["x-should-retry"] == "false"
    bad = post(server, {"messages": ASK})  # no max_tokens
    assert bad.status_code == 400 and bad.headers["x-should-retry"] == "false"
    big = httpx.post(server.url + "/v1/messages", content=b" " * (2 << 20), headers=HEADERS, timeout=60)
    assert big.status_code == 413 and big.headers["x-should-retry"] == "false"
    ok = post(server, {"messages": ASK, "max_tokens": 2})
    assert ok.status_code == 200 and "x-should-retry" not in ok.headers
    ids = set()
    for r in (wrong, unknown, bad, big, ok, httpx.get(server.url + "/health", timeout=30)):
        assert r.headers["request-id"] == r.headers["x-request-id"]
        ids.add(r.headers["request-id"])
    assert len(ids) == 6
    mine = httpx.get(server.url + "/health", headers={"x-request-id": "trace-42"}, timeout=30)
    assert mine.headers["request-id"] == "trace-42"


@pytest.mark.parametrize(
    "thinking", [{"type": "enabled", "budget_tokens": 31999}, {"type": "adaptive"}, {"type": "disabled"}]
)
def test_thinking_settings_are_accepted(server, thinking):
    r = post(server, {"messages": ASK, "max_tokens": 4, "thinking": thinking})
    assert r.status_code == 200, r.text
    assert r.json()["stop_reason"] in ("max_tokens", "end_turn")


def test_thinking_stops_at_its_budget(server):
    """A template that opens a <think> span: with a budget the span is closed after that many tokens
    (a random model never closes it itself) and the answer follows; without one it runs on."""
    body = {"model": "tiny-think", "messages": ASK, "max_tokens": 40, "seed": 3}  # seeded: no early end
    capped = post(server, {**body, "thinking": {"type": "enabled", "budget_tokens": 6}}).json()
    assert [b["type"] for b in capped["content"]] == ["thinking", "text"], capped
    assert capped["content"][0]["thinking"]
    free = post(server, {**body, "thinking": {"type": "enabled", "budget_tokens": 1000}}).json()
    assert [b["type"] for b in free["content"]] == ["thinking"]
    with httpx.stream(
        "POST",
        server.url + "/v1/messages",
        json={**body, "stream": True, "thinking": {"type": "enabled", "budget_tokens": 6}},
        headers=HEADERS,
        timeout=120,
    ) as r:
        events = json_events(read_sse(r))
    kinds = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
    assert kinds == ["thinking", "text"]
    # a Delta carries at most one token's text here, and a thinking_delta at most one Delta's
    thought = [e for e in events if e["type"] == "content_block_delta" and e["delta"]["type"] == "thinking_delta"]
    assert 1 <= len(thought) <= 6


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_budget_counts_from_the_think_the_model_writes(server, claude, stream):
    """Qwen3's own templates end at the assistant's turn and the model opens <think> itself: the
    budget counts from there, then </think> is forced and the answer follows."""
    body = {"model": "tiny-opens", "messages": ASK, "max_tokens": 30}
    free = claude.messages.create(**body, thinking={"type": "enabled", "budget_tokens": 1000})
    assert [(b.type, b.thinking) for b in free.content] == [("thinking", "x" * 29)]  # <think> then x to the end
    if stream:
        with claude.messages.stream(**body, thinking={"type": "enabled", "budget_tokens": 5}) as s:
            capped = s.get_final_message()
    else:
        capped = claude.messages.create(**body, thinking={"type": "enabled", "budget_tokens": 5})
    assert [b.type for b in capped.content] == ["thinking", "text"]
    assert capped.content[0].thinking == "x" * 5 and capped.content[1].text == "y" * 22  # </think>, blank line: 2
    assert capped.stop_reason == "max_tokens" and capped.usage.output_tokens == 30


def test_a_tool_schema_the_grammar_engine_cannot_read_is_a_400_naming_it(server):
    r = post(server, {"messages": ASK, "max_tokens": 2, "tools": [{"name": "f", "input_schema": {"type": "bogus"}}]})
    assert r.status_code == 400 and r.json()["error"] == {
        "type": "invalid_request_error",
        "message": "Invalid schema in 'tools.0.input_schema': Invalid type: bogus",
    }


def _calls(message: dict) -> list[dict]:
    text = "".join(b.get("text", "") for b in message["content"] if b["type"] == "text")
    assert "<tool_call>" not in text and "</tool_call>" not in text
    return [b for b in message["content"] if b["type"] == "tool_use"]


def test_forced_tool_calls_are_exactly_what_was_asked(server):
    base = {"system": SYSTEM, "messages": ASK, "tools": TOOLS, "max_tokens": 200}
    named = post(server, {**base, "tool_choice": {"type": "tool", "name": "tool_7"}}).json()
    assert named["stop_reason"] == "tool_use" and [c["name"] for c in _calls(named)] == ["tool_7"]
    assert _calls(named)[0]["input"]["unit"] in ("c", "f")
    single = post(server, {**base, "tool_choice": {"type": "any", "disable_parallel_tool_use": True}}).json()
    assert single["stop_reason"] == "tool_use" and len(_calls(single)) == 1
    for seed in range(3):  # parallel calls allowed: however many the model writes, the stop is tool_use
        many = post(server, {**base, "max_tokens": 150, "seed": seed, "tool_choice": {"type": "any"}}).json()
        assert many["stop_reason"] == "tool_use" and len(_calls(many)) >= 1


def test_streamed_usage_agrees_and_a_forced_call_streams_as_tool_use(server, claude):
    body = {"system": SYSTEM, "messages": ASK, "max_tokens": 3, "stream": True}
    post(server, {**body, "stream": False})  # the prompt is now in the prefix cache
    with httpx.stream(
        "POST", server.url + "/v1/messages", json={"model": "tiny", **body}, headers=HEADERS, timeout=120
    ) as r:
        events = json_events(read_sse(r))
    start = events[0]["message"]["usage"]
    delta = next(e for e in events if e["type"] == "message_delta")["usage"]
    assert start["cache_read_input_tokens"] > 0
    for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
        assert start[k] == delta[k], k
    with claude.messages.stream(
        model="tiny",
        max_tokens=200,
        system=SYSTEM,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "tool", "name": "tool_3", "disable_parallel_tool_use": True},
    ) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use" and [b.name for b in final.content] == ["tool_3"]
    forced = {"type": "tool", "name": "tool_3"}  # the prompt then describes that tool alone
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == count(
        server, {"system": SYSTEM, "messages": ASK, "tools": TOOLS, "tool_choice": forced}
    )


def test_model_list_in_anthropic_shape(server, claude):
    page = claude.models.list()
    assert [m.id for m in page.data] == ["small", "tiny", "tiny-opens", "tiny-think"] and page.data[0].type == "model"
    raw = httpx.get(server.url + "/v1/models", headers=HEADERS, timeout=30).json()
    assert raw["has_more"] is False and raw["first_id"] == "small" and raw["last_id"] == "tiny-think"
    assert set(raw["data"][0]) == {"type", "id", "display_name", "created_at"}
    assert claude.models.retrieve("tiny").id == "tiny"
    openai_shape = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert openai_shape.json()["object"] == "list"
    missing = httpx.get(server.url + "/v1/models/nope", headers=HEADERS, timeout=30)
    assert missing.status_code == 404 and missing.json()["type"] == "error"


def test_a_claude_code_shaped_turn(server, claude):
    """The shape of a real session: billing block, cached system blocks, 20+ tools, a system entry
    mid-conversation, thinking with a budget, max_tokens 32000 refused in Anthropic's words, then the
    same request with the room left."""
    system = [billing("2.0.0"), {"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
    messages = [
        *ASK,
        {"role": "assistant", "content": [{"type": "text", "text": "Sure."}]},
        {"role": "system", "content": "The user switched to plan mode."},
        {"role": "user", "content": [{"type": "text", "text": "Go on.", "cache_control": {"type": "ephemeral"}}]},
    ]
    body = {
        "system": system,
        "messages": messages,
        "tools": TOOLS,
        "thinking": {"type": "enabled", "budget_tokens": 31999},
        "metadata": {"user_id": "u"},
    }
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model="tiny", max_tokens=32000, **body)
    p, limit = map(int, re.search(r"(\d+) \+ 32000 > (\d+)", e.value.body["error"]["message"]).groups())
    assert limit == CONTEXT
    m = claude.messages.create(model="tiny", max_tokens=min(limit - p, 16), **body)
    assert m.stop_reason in ("max_tokens", "end_turn", "tool_use")
    assert json.loads(m.model_dump_json())["usage"]["input_tokens"] >= 0

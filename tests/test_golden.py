"""Golden transcripts: the SSE streams of fixed scenarios in each dialect, for a fixed model
(SmolLM2-135M-Instruct) and fixed seeds, kept in tests/golden/ and compared by what the API promises
(tests/transcript.py): events, field names and order, ids, finish reasons, token counts and text
exactly; logprobs within 1e-3, since torch and our kernels pick CPU-specific code at run time.

Only what must differ between runs is normalised: generated ids and the `created` clock. Each
scenario's system prompt starts with its own name, so no scenario shares a cached prefix with
another and usage counts are exact too.

Greedy text could flip between machines where the top two tokens are nearly tied.
test_greedy_goldens_have_wide_margins measures the margin at every greedy step of the scenarios whose
choice is the model's own argmax, and fails below MIN_MARGIN (40x the cross-machine noise).

To re-record after an intended change: CORTEX_UPDATE_GOLDEN=1 pytest tests/test_golden.py, then
review the diff of tests/golden/ like code.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import httpx
import pytest

from tests.conftest import SMOL_KEY
from tests.transcript import assert_transcript_matches

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("CORTEX_UPDATE_GOLDEN") == "1"

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
TIME = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
O_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time in a city", "parameters": TIME}},
]
A_TOOLS = [{"name": "get_weather", "description": "Current weather", "input_schema": WEATHER}]
Q = "What is the weather in Paris?"
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}

# name -> request body (model, system prompt and stream are added)
OPENAI = {
    "text_greedy": {"messages": [{"role": "user", "content": Q}], "max_tokens": 8, "temperature": 0},
    "text_seeded": {"messages": [{"role": "user", "content": Q}], "max_tokens": 8, "temperature": 0.9, "seed": 7},
    "top_k_top_p": {"messages": [{"role": "user", "content": Q}], "max_tokens": 8, "top_k": 5, "top_p": 0.8, "seed": 1},
    "min_p": {"messages": [{"role": "user", "content": Q}], "max_tokens": 8, "min_p": 0.2, "seed": 2},
    "penalties": {
        "messages": [{"role": "user", "content": Q}],
        "max_tokens": 10,
        "temperature": 0,
        "presence_penalty": 1.5,
        "frequency_penalty": 1.0,
    },
    "stop_string": {"messages": [{"role": "user", "content": Q}], "max_tokens": 16, "temperature": 0, "stop": [","]},
    "one_token": {"messages": [{"role": "user", "content": Q}], "max_tokens": 1, "temperature": 0},
    "n_two": {"messages": [{"role": "user", "content": Q}], "max_tokens": 5, "n": 2, "temperature": 0.8, "seed": 5},
    "usage": {
        "messages": [{"role": "user", "content": Q}],
        "max_tokens": 6,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    },
    "logprobs": {
        "messages": [{"role": "user", "content": Q}],
        "max_tokens": 4,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    },
    "logit_bias": {
        "messages": [{"role": "user", "content": Q}],
        "max_tokens": 6,
        "temperature": 0,
        "logit_bias": {"504": -100, "1073": 5},
    },
    "tool_required": {"messages": [{"role": "user", "content": Q}], "tools": O_TOOLS, "tool_choice": "required"},
    "tool_named": {
        "messages": [{"role": "user", "content": Q}],
        "tools": O_TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
    },
    "tool_auto": {"messages": [{"role": "user", "content": Q}], "tools": O_TOOLS, "max_tokens": 24},
    "tool_none": {
        "messages": [{"role": "user", "content": Q}],
        "tools": O_TOOLS,
        "tool_choice": "none",
        "max_tokens": 8,
    },
    "tool_result": {
        "messages": [
            {"role": "user", "content": Q},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "unit": "celsius"}'},
        ],
        "tools": O_TOOLS,
        "max_tokens": 12,
    },
    "json_object": {
        "messages": [{"role": "user", "content": "Describe Paris as JSON."}],
        "response_format": {"type": "json_object"},
        "max_tokens": 40,
    },
    "json_schema": {
        "messages": [{"role": "user", "content": "Describe Paris as JSON."}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "city",
                "schema": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "big": {"type": "boolean"}},
                    "required": ["name", "big"],
                },
            },
        },
    },
    "think_on": {"model": "smol-think", "messages": [{"role": "user", "content": Q}], "max_tokens": 8},
    "think_off": {
        "model": "smol-think",
        "messages": [{"role": "user", "content": Q}],
        "max_tokens": 8,
        "reasoning_effort": "none",
    },
    "multi_turn": {
        "messages": [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": Q},
        ],
        "max_tokens": 8,
    },
}

ANTHROPIC = {
    "text": {"messages": [{"role": "user", "content": Q}], "max_tokens": 8},
    "text_blocks": {"messages": [{"role": "user", "content": [{"type": "text", "text": Q}]}], "max_tokens": 8},
    "seeded": {
        "messages": [{"role": "user", "content": Q}],
        "max_tokens": 8,
        "temperature": 0.9,
        "top_k": 20,
        "seed": 4,
    },
    "top_p": {
        "messages": [{"role": "user", "content": Q}],
        "max_tokens": 8,
        "temperature": 0.7,
        "top_p": 0.5,
        "seed": 6,
    },
    "stop_sequence": {"messages": [{"role": "user", "content": Q}], "max_tokens": 16, "stop_sequences": [","]},
    "one_token": {"messages": [{"role": "user", "content": Q}], "max_tokens": 1},
    "end_turn": {"messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 24},
    "tool_any": {"messages": [{"role": "user", "content": Q}], "tools": A_TOOLS, "tool_choice": {"type": "any"}},
    "tool_named": {
        "messages": [{"role": "user", "content": Q}],
        "tools": A_TOOLS,
        "tool_choice": {"type": "tool", "name": "get_weather"},
    },
    "tool_single": {
        "messages": [{"role": "user", "content": "Weather in Paris and Rome?"}],
        "tools": A_TOOLS,
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    },
    "tool_auto": {"messages": [{"role": "user", "content": Q}], "tools": A_TOOLS, "max_tokens": 24},
    "tool_none": {"messages": [{"role": "user", "content": Q}], "tools": A_TOOLS, "tool_choice": {"type": "none"}},
    "tool_result": {
        "messages": [
            {"role": "user", "content": Q},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "21 C, sunny"}]},
        ],
        "tools": A_TOOLS,
        "max_tokens": 12,
    },
    "tool_error": {
        "messages": [
            {"role": "user", "content": Q},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True, "content": "city required"}
                ],
            },
        ],
        "tools": A_TOOLS,
        "max_tokens": 12,
    },
    "thinking_on": {
        "model": "smol-think",
        "messages": [{"role": "user", "content": Q}],
        "max_tokens": 8,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    },
    "thinking_off": {"model": "smol-think", "messages": [{"role": "user", "content": Q}], "max_tokens": 8},
    "thinking_disabled": {
        "model": "smol-think",
        "messages": [{"role": "user", "content": Q}],
        "max_tokens": 8,
        "thinking": {"type": "disabled"},
    },
    "multi_turn": {
        "messages": [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello! How can I help?"}]},
            {"role": "user", "content": Q},
        ],
        "max_tokens": 8,
    },
    "metadata": {"messages": [{"role": "user", "content": Q}], "max_tokens": 6, "metadata": {"user_id": "u-1"}},
    "system_blocks": {"messages": [{"role": "user", "content": Q}], "max_tokens": 6, "system": "extra"},
}

_IDS = [
    (re.compile(rb"chatcmpl-[0-9a-f]{32}"), b"chatcmpl-ID"),
    (re.compile(rb"call_[0-9a-f]{24}"), b"call_ID"),
    (re.compile(rb"msg_[0-9a-f]{24}"), b"msg_ID"),
    (re.compile(rb"toolu_[0-9a-f]{24}"), b"toolu_ID"),
    (re.compile(rb'"created":\d+'), b'"created":0'),
]


# keep-alives come when a second passes without an event: when, and how many, is the clock's doing
_KEEPALIVES = re.compile(rb'(: keep-alive\n\n|event: ping\ndata: \{"type":"ping"\}\n\n)')


def normalise(raw: bytes) -> bytes:
    for pattern, stand_in in _IDS:
        raw = pattern.sub(stand_in, raw)
    return _KEEPALIVES.sub(b"", raw)


def _transcript(server, path: str, name: str, body: dict, headers: dict) -> bytes:
    with httpx.stream("POST", server.url + path, json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        return normalise(r.read())


def _check(dialect: str, name: str, got: bytes) -> None:
    from workers import native

    if native.kernels() is None:  # the server's workers fall back to PyTorch's bf16 kernels: other numerics
        pytest.skip("golden transcripts are recorded with the native CPU kernels (no C compiler here)")
    file = GOLDEN / dialect / f"{name}.sse"
    if UPDATE:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(got)
        return
    assert file.exists(), f"no golden transcript {file}; record it with CORTEX_UPDATE_GOLDEN=1"
    assert_transcript_matches(got.decode(), file.read_text(), f"{dialect}/{name} ({file})")


@pytest.mark.parametrize("name", sorted(OPENAI))
def test_openai_stream_matches_its_golden_transcript(smol_server, name):
    body = {"model": "smol", "max_tokens": 80, "temperature": 0, **OPENAI[name], "stream": True}
    body["messages"] = [{"role": "system", "content": f"Scenario {name}. Be brief."}, *body["messages"]]
    got = _transcript(smol_server, "/v1/chat/completions", name, body, {"Authorization": f"Bearer {SMOL_KEY}"})
    _check("openai", name, got)


@pytest.mark.parametrize("name", sorted(ANTHROPIC))
def test_anthropic_stream_matches_its_golden_transcript(smol_server, name):
    body = {"model": "smol", "max_tokens": 80, "temperature": 0, **ANTHROPIC[name], "stream": True}
    body["system"] = f"Scenario {name}. Be brief. {body.get('system', '')}".strip()
    if name == "system_blocks":
        body["system"] = [{"type": "text", "text": f"Scenario {name}."}, {"type": "text", "text": "Be brief."}]
    headers = {"x-api-key": SMOL_KEY, "anthropic-version": "2023-06-01"}
    got = _transcript(smol_server, "/v1/messages", name, body, headers)
    _check("anthropic", name, got)


# Greedy scenarios whose every token is the model's own argmax: no penalties, bias or grammar. The
# scenarios left out choose under a grammar mask or adjusted logits, which logprobs do not show;
# they are checked by running the whole set under each CPU kernel kind (see the closing of issue 17).
# 40x the 5e-5 logprob noise measured between an AVX2 and an AVX-512 machine. Measured on 2026-12-05,
# the narrowest step of these scenarios leads by 0.0088 (anthropic/thinking_off, step 2: " is" over ",");
# all of them pass under ATEN_CPU_CAPABILITY=default, avx2 and avx512 alike.
MIN_MARGIN = 2e-3
GREEDY_OPENAI = ["logprobs", "multi_turn", "one_token", "stop_string", "text_greedy", "think_off", "think_on", "usage"]
GREEDY_ANTHROPIC = [
    "end_turn", "metadata", "multi_turn", "one_token", "stop_sequence", "text", "text_blocks",
    "thinking_disabled", "thinking_off", "thinking_on",
]  # fmt: skip


def _as_openai(name: str) -> dict:
    """The OpenAI body that renders the same prompt as the Anthropic scenario ``name``."""
    spec = ANTHROPIC[name]
    system = f"Scenario {name}. Be brief. {spec.get('system', '')}".strip()
    messages = [{"role": "system", "content": system}]
    for m in spec["messages"]:
        content = m["content"]
        if isinstance(content, list):
            content = "".join(block["text"] for block in content)
        messages.append({"role": m["role"], "content": content})
    body = {"model": spec.get("model", "smol"), "messages": messages, "max_tokens": spec["max_tokens"]}
    if "stop_sequences" in spec:
        body["stop"] = spec["stop_sequences"]
    if spec.get("model") == "smol-think" and spec.get("thinking", {}).get("type") != "enabled":
        body["reasoning_effort"] = "none"  # Anthropic thinks only when asked; the template's default thinks
    return body


def _greedy_bodies() -> dict[str, tuple[dict, dict]]:
    """scenario -> (OpenAI body, the usage its golden transcript records)."""
    out = {}
    for name in GREEDY_OPENAI:
        body = {"model": "smol", "max_tokens": 80, **OPENAI[name]}
        body["messages"] = [{"role": "system", "content": f"Scenario {name}. Be brief."}, *body["messages"]]
        out[f"openai/{name}"] = (body, None)
    for name in GREEDY_ANTHROPIC:
        events = [json.loads(line[6:]) for line in (GOLDEN / "anthropic" / f"{name}.sse").read_text().splitlines()
                  if line.startswith("data: ")]  # fmt: skip
        start = events[0]["message"]["usage"]  # the prompt: the tokens not cached and those that were
        usage = {"prompt_tokens": start["input_tokens"] + start["cache_read_input_tokens"],
                 "completion_tokens": events[-2]["usage"]["output_tokens"]}  # fmt: skip
        out[f"anthropic/{name}"] = (_as_openai(name), usage)
    return out


def test_greedy_goldens_have_wide_margins(smol_server):
    """At every greedy step of these scenarios the chosen token leads the runner-up by MIN_MARGIN
    or more, so no CPU's rounding can flip the golden text. Anthropic scenarios are replayed through
    the OpenAI dialect (which reports logprobs) with the same prompt: equal token counts show it."""
    from workers import native

    if native.kernels() is None:
        pytest.skip("golden transcripts are recorded with the native CPU kernels (no C compiler here)")
    narrow = []
    for label, (body, usage) in _greedy_bodies().items():
        body = {**body, "temperature": 0, "logprobs": True, "top_logprobs": 2}
        r = httpx.post(smol_server.url + "/v1/chat/completions", json=body, timeout=120,
                       headers={"Authorization": f"Bearer {SMOL_KEY}"})  # fmt: skip
        assert r.status_code == 200, r.text
        got = r.json()
        if usage is not None:
            assert {k: got["usage"][k] for k in usage} == usage, f"{label}: not the same prompt as its golden"
        for step, token in enumerate(got["choices"][0]["logprobs"]["content"]):
            first, second = token["top_logprobs"]
            assert first["token"] == token["token"], f"{label}: step {step} did not take the argmax"
            if first["logprob"] - second["logprob"] < MIN_MARGIN:
                narrow.append((label, step, token["token"], second["token"], first["logprob"] - second["logprob"]))
    assert not narrow, f"near ties (scenario, step, chosen, runner-up, margin): {narrow}"

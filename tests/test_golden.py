"""Golden transcripts: the exact SSE bytes of fixed scenarios in each dialect, for a fixed model
(SmolLM2-135M-Instruct) and fixed seeds, kept in tests/golden/ and compared byte for byte.

Only what must differ between runs is normalised: generated ids and the `created` clock. Each
scenario's system prompt starts with its own name, so no scenario shares a cached prefix with
another and usage counts are exact too.

To re-record after an intended change: CORTEX_UPDATE_GOLDEN=1 pytest tests/test_golden.py, then
review the diff of tests/golden/ like code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest

from tests.conftest import SMOL_KEY

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
    assert got.decode() == file.read_text(), f"{dialect}/{name} differs from {file}"


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

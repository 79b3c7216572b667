"""Both dialects, driven by the official SDKs against a real `cortex serve` of a real model.

The server holds SmolLM2-135M-Instruct twice: `smol` with its own template, and `smol-think` with a
template that opens a `<think>` span (as Qwen3 and DeepSeek-R1 templates do) unless thinking is
switched off. API keys are on, so every client sends one. The SDKs' typed parsing is the judge.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import openai
import pytest

from tests.conftest import SMOL_KEY as KEY

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
TIME = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
OPENAI_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time in a city", "parameters": TIME}},
]
ANTHROPIC_TOOLS = [
    {
        "name": t["function"]["name"],
        "description": t["function"]["description"],
        "input_schema": t["function"]["parameters"],
    }
    for t in OPENAI_TOOLS
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris and in London?"}]
GREEDY = {"temperature": 0}  # this Anthropic SDK no longer takes sampling parameters; the API still does


@pytest.fixture(scope="module")
def server(smol_server):
    return smol_server


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def _valid_call(name: str, arguments: dict) -> None:
    jsonschema.validate(arguments, SCHEMAS[name])


# -- OpenAI ----------------------------------------------------------------------------------------------


def test_openai_text_and_its_stream_agree(oai):
    r = oai.chat.completions.create(model="smol", messages=ASK, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and choice.message.content
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
    stream = oai.chat.completions.create(
        model="smol", messages=ASK, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].usage.completion_tokens == 12


def test_openai_stop_sequence_and_max_tokens(oai):
    full = oai.chat.completions.create(model="smol", messages=ASK, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    cut = text.split()[2]  # a word the model writes: stopping on it must end the text before it
    r = oai.chat.completions.create(model="smol", messages=ASK, max_tokens=24, temperature=0, stop=[cut])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == text[: text.index(cut)]


def test_openai_forced_tool_call_is_well_formed(oai):
    r = oai.chat.completions.create(
        model="smol",
        messages=ASK,
        tools=OPENAI_TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=80,
        temperature=0,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    for call in choice.message.tool_calls:
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        _valid_call(call.function.name, json.loads(call.function.arguments))


def test_openai_parallel_tool_calls_streamed(oai):
    """tool_choice=required lets the model make several calls; greedy SmolLM2 asks for two."""
    stream = oai.chat.completions.create(
        model="smol",
        messages=ASK,
        tools=OPENAI_TOOLS,
        tool_choice="required",
        max_tokens=120,
        temperature=0,
        stream=True,
    )
    calls, finish = {}, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and len(calls) >= 2
    for c in calls.values():
        _valid_call(c["name"], json.loads(c["arguments"]))


def test_openai_tool_result_round_trip(oai):
    first = oai.chat.completions.create(
        model="smol", messages=ASK, tools=OPENAI_TOOLS, tool_choice="required", max_tokens=120, temperature=0
    )
    message = first.choices[0].message
    results = [
        {"role": "tool", "tool_call_id": c.id, "content": json.dumps({"temperature": 21, "sky": "clear"})}
        for c in message.tool_calls
    ]
    r = oai.chat.completions.create(
        model="smol",
        messages=[*ASK, message.model_dump(exclude_none=True), *results],
        tools=OPENAI_TOOLS,
        max_tokens=16,
        temperature=0,
    )
    assert r.choices[0].message.content and r.usage.prompt_tokens > first.usage.prompt_tokens


def test_openai_json_modes_parse_and_validate(oai):
    ask = [{"role": "user", "content": "Describe Paris as JSON."}]
    r = oai.chat.completions.create(
        model="smol", messages=ask, response_format={"type": "json_object"}, max_tokens=120, temperature=0
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "population": {"type": "integer"}, "capital": {"type": "boolean"}},
        "required": ["name", "population", "capital"],
    }
    r = oai.chat.completions.create(
        model="smol",
        messages=ask,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
        max_tokens=120,
        temperature=0.8,
        seed=3,
    )
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_openai_reasoning_on_and_off(oai):
    on = oai.chat.completions.create(model="smol-think", messages=ASK, max_tokens=12, temperature=0)
    assert on.choices[0].message.reasoning_content and not on.choices[0].message.content
    off = oai.chat.completions.create(
        model="smol-think", messages=ASK, max_tokens=12, temperature=0, reasoning_effort="none"
    )
    assert off.choices[0].message.content and getattr(off.choices[0].message, "reasoning_content", None) is None
    stream = oai.chat.completions.create(model="smol-think", messages=ASK, max_tokens=12, temperature=0, stream=True)
    streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in stream)
    assert streamed == on.choices[0].message.reasoning_content


def test_openai_legacy_completions(oai, server):
    r = oai.completions.create(model="smol", prompt="The capital of France is", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text and r.usage.completion_tokens == 6
    tokens = httpx.post(
        server.url + "/v1/completions",
        json={"model": "smol", "prompt": [504, 3575, 282, 4649, 314], "max_tokens": 3, "temperature": 0},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=120,
    ).json()
    assert tokens["usage"]["prompt_tokens"] == 5 and tokens["choices"][0]["text"]


def test_openai_errors(oai, server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="smol", messages=ASK, max_tokens=2)
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="no-such-model", messages=ASK, max_tokens=2)
    assert "no-such-model" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="smol", messages=[{"role": "user", "content": "word " * 600}], max_tokens=2)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="smol", messages="not a list", max_tokens=2)  # type: ignore[arg-type]
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200  # open without a key


# -- Anthropic -------------------------------------------------------------------------------------------


def test_anthropic_text_and_stream(claude):
    m = claude.messages.create(model="smol", max_tokens=12, messages=ASK, extra_body=GREEDY)
    assert m.type == "message" and m.stop_reason == "max_tokens" and m.content[0].type == "text"
    assert m.usage.output_tokens == 12
    with claude.messages.stream(model="smol", max_tokens=12, messages=ASK, extra_body=GREEDY) as s:
        kinds = [ev.type for ev in s]
        final = s.get_final_message()
    assert final.content[0].text == m.content[0].text
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "content_block_stop" in kinds


def test_anthropic_system_and_stop_sequence(claude):
    base = claude.messages.create(model="smol", max_tokens=24, system="Be brief.", messages=ASK, extra_body=GREEDY)
    text = base.content[0].text
    cut = text.split()[2]
    m = claude.messages.create(
        model="smol",
        max_tokens=24,
        system=[{"type": "text", "text": "Be brief."}],
        messages=ASK,
        extra_body=GREEDY,
        stop_sequences=[cut],
    )
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == cut and m.content[0].text == text[: text.index(cut)]


def test_anthropic_tool_use_round_trip(claude):
    m = claude.messages.create(
        model="smol",
        max_tokens=120,
        messages=ASK,
        tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "any"},
        extra_body=GREEDY,
    )
    uses = [b for b in m.content if b.type == "tool_use"]
    assert m.stop_reason == "tool_use" and uses
    for b in uses:
        assert b.id.startswith("toolu_")
        _valid_call(b.name, b.input)
    reply = claude.messages.create(
        model="smol",
        max_tokens=16,
        tools=ANTHROPIC_TOOLS,
        extra_body=GREEDY,
        messages=[
            *ASK,
            {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": b.id, "content": "21 degrees, clear"} for b in uses],
            },
        ],
    )
    assert reply.content and reply.usage.input_tokens > 0


def test_anthropic_streamed_tool_use(claude):
    with claude.messages.stream(
        model="smol",
        max_tokens=120,
        messages=ASK,
        tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "tool", "name": "get_time", "disable_parallel_tool_use": True},
        extra_body=GREEDY,
    ) as s:
        kinds = [ev.type for ev in s]
        final = s.get_final_message()
    assert "input_json" in kinds and final.stop_reason == "tool_use"
    assert [b.name for b in final.content] == ["get_time"]
    _valid_call("get_time", final.content[0].input)


def test_anthropic_thinking_on_and_off(claude):
    on = claude.messages.create(
        model="smol-think",
        max_tokens=12,
        messages=ASK,
        thinking={"type": "enabled", "budget_tokens": 1024},
        extra_body=GREEDY,
    )
    assert [b.type for b in on.content] == ["thinking"] and on.content[0].thinking
    off = claude.messages.create(model="smol-think", max_tokens=12, messages=ASK, extra_body=GREEDY)
    assert [b.type for b in off.content] == ["text"]


def test_anthropic_count_tokens(claude, oai):
    counted = claude.messages.count_tokens(model="smol", messages=ASK, system="Be brief.")
    r = claude.messages.create(model="smol", max_tokens=1, messages=ASK, system="Be brief.", extra_body=GREEDY)
    assert counted.input_tokens == r.usage.input_tokens + r.usage.cache_read_input_tokens


def test_anthropic_errors(claude, server):
    bad = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        bad.messages.create(model="smol", max_tokens=2, messages=ASK)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="no-such-model", max_tokens=2, messages=ASK)
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model="smol", max_tokens=2, messages=[{"role": "user", "content": "word " * 600}])
    assert e.value.body["error"]["message"].startswith("prompt is too long: ")
    r = httpx.post(server.url + "/v1/messages", content=b"[1,", headers={"x-api-key": KEY}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(
        server.url + "/v1/messages", json={"model": "smol", "messages": ASK}, headers={"x-api-key": KEY}, timeout=30
    )
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]


def test_a_forced_tool_whose_schema_uses_defs_and_refs(oai, claude):
    """Pydantic writes nested models into $defs; the call grammar wraps the tool's schema and must
    keep its refs pointing into it (issue 20)."""
    schema = {
        "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
        "type": "object",
        "properties": {"place": {"$ref": "#/$defs/Place"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["place", "unit"],
    }
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": schema}}
    r = oai.chat.completions.create(
        model="smol",
        messages=ASK,
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        max_tokens=80,
        temperature=0,
    )
    (call,) = r.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), schema)
    m = claude.messages.create(
        model="smol",
        max_tokens=80,
        messages=ASK,
        tools=[{"name": "get_weather", "description": "Weather", "input_schema": schema}],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        extra_body=GREEDY,
    )
    (use,) = [b for b in m.content if b.type == "tool_use"]
    jsonschema.validate(use.input, schema)

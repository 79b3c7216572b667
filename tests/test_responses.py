"""The OpenAI Responses API (POST /v1/responses), driven by the official SDK against a real model.

The same server as tests/test_dialects.py: SmolLM2 as `smol`, and as `smol-think` with a template
that opens a `<think>` span. Greedy answers must equal the chat endpoint's for the same messages:
both read into the same engine request.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import SMOL_KEY as KEY
from tests.test_dialects import ASK, SCHEMAS, WEATHER

pytestmark = pytest.mark.slow

TOOLS = [
    {"type": "function", "name": "get_weather", "description": "Current weather", "parameters": WEATHER},
    {
        "type": "function",
        "name": "get_time",
        "description": "Local time in a city",
        "parameters": SCHEMAS["get_time"],
    },
]


@pytest.fixture(scope="module")
def oai(smol_server):
    return openai.OpenAI(base_url=smol_server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_text_equals_the_chat_endpoints_and_the_stream_equals_the_whole(oai):
    chat = oai.chat.completions.create(model="smol", messages=ASK, max_tokens=12, temperature=0)
    r = oai.responses.create(model="smol", input=ASK, max_output_tokens=12, temperature=0)
    assert r.output_text == chat.choices[0].message.content
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 12 and r.usage.input_tokens == chat.usage.prompt_tokens
    assert [item.type for item in r.output] == ["message"] and r.id.startswith("resp_")

    with oai.responses.stream(model="smol", input=ASK, max_output_tokens=12, temperature=0) as stream:
        events = list(stream)
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.incomplete"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].response.output[0].content[0].text == r.output_text  # as OpenAI: cut short
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_a_stream_that_completes_is_read_whole_by_the_sdk_helper(oai):
    """The SDK's stream helper checks the events' order and rebuilds the response from them."""
    ask = [{"role": "user", "content": "Say the word yes."}]
    r = oai.responses.create(model="smol", input=ask, max_output_tokens=60, temperature=0)
    assert r.status == "completed"
    with oai.responses.stream(model="smol", input=ask, max_output_tokens=60, temperature=0) as stream:
        final = stream.get_final_response()
    assert final.output_text == r.output_text and final.usage.output_tokens == r.usage.output_tokens


def test_instructions_and_a_plain_string_input(oai):
    chat = oai.chat.completions.create(
        model="smol",
        messages=[{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
    )
    r = oai.responses.create(
        model="smol", instructions="Answer in French.", input="Say hello.", max_output_tokens=8, temperature=0
    )
    assert r.output_text == chat.choices[0].message.content


def test_a_forced_function_call_and_its_output_round_trip(oai):
    r = oai.responses.create(
        model="smol",
        input=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=80,
        temperature=0,
    )
    calls = [item for item in r.output if item.type == "function_call"]
    assert calls and r.status == "completed"
    for call in calls:
        assert call.name == "get_weather" and call.call_id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), WEATHER)
    results = [
        {"type": "function_call_output", "call_id": c.call_id, "output": json.dumps({"temperature": 21})} for c in calls
    ]
    follow = oai.responses.create(
        model="smol",
        input=[*ASK, *[c.model_dump(exclude_none=True) for c in calls], *results],
        tools=TOOLS,
        max_output_tokens=16,
        temperature=0,
    )
    assert follow.output_text and follow.usage.input_tokens > r.usage.input_tokens


def test_streamed_function_calls_are_well_formed_events(oai):
    with oai.responses.stream(
        model="smol", input=ASK, tools=TOOLS, tool_choice="required", max_output_tokens=120, temperature=0
    ) as stream:
        done = [e.arguments for e in stream if e.type == "response.function_call_arguments.done"]
        final = stream.get_final_response()
    calls = [item for item in final.output if item.type == "function_call"]
    assert len(calls) >= 1 and [c.arguments for c in calls] == done
    for c in calls:
        jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])


def test_json_schema_output(oai):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "population": {"type": "integer"}, "capital": {"type": "boolean"}},
        "required": ["name", "population", "capital"],
    }
    r = oai.responses.create(
        model="smol",
        input=[{"role": "user", "content": "Describe Paris as JSON."}],
        text={"format": {"type": "json_schema", "name": "city", "schema": schema}},
        max_output_tokens=120,
        temperature=0.8,
        extra_body={"seed": 3},  # greedy SmolLM2 writes digits forever; so does the chat test's
    )
    jsonschema.validate(json.loads(r.output_text), schema)


def test_reasoning_is_a_reasoning_item_and_effort_none_turns_it_off(oai):
    chat = oai.chat.completions.create(model="smol-think", messages=ASK, max_tokens=12, temperature=0)
    r = oai.responses.create(model="smol-think", input=ASK, max_output_tokens=12, temperature=0)
    assert r.output[0].type == "reasoning"
    assert r.output[0].content[0].text == chat.choices[0].message.reasoning_content
    with oai.responses.stream(model="smol-think", input=ASK, max_output_tokens=12, temperature=0) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.reasoning_text.delta")
    assert deltas == r.output[0].content[0].text
    off = oai.responses.create(
        model="smol-think", input=ASK, max_output_tokens=12, temperature=0, reasoning={"effort": "none"}
    )
    assert [item.type for item in off.output] == ["message"] and off.output_text


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
        ({"input": []}, "input"),
        ({"temperature": 3}, "temperature"),
        ({"tool_choice": {"type": "function", "name": "nope"}, "tools": TOOLS}, "tool_choice"),
    ],
)
def test_what_it_cannot_do_is_a_400_naming_the_field(smol_server, extra, param):
    body = {"model": "smol", "input": "Hi", **extra}
    r = httpx.post(smol_server.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_an_unknown_model_is_a_404(oai):
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model="nope", input="Hi")

"""The OpenAI Responses API (POST /v1/responses), driven by the official SDK against a real model.

The same server as tests/test_dialects.py: SmolLM2 as `smol`, and as `smol-think` with a template
that opens a `<think>` span. Greedy answers must equal the chat endpoint's for the same messages:
both read into the same engine request.
"""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import time

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from cortex.api.auth import key_id
from cortex.api.response_store import ResponseStore
from tests.conftest import SMOL_KEY as KEY
from tests.conftest import Server, tiny_models_toml
from tests.test_claude_code import write_bigram_model
from tests.test_dialects import ASK, SCHEMAS, WEATHER

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_stream_that_completes_is_read_whole_by_the_sdk_helper(oai):
    """The SDK's stream helper checks the events' order and rebuilds the response from them."""
    ask = [{"role": "user", "content": "Say the word yes."}]
    r = oai.responses.create(model="smol", input=ask, max_output_tokens=60, temperature=0)
    assert r.status == "completed"
    with oai.responses.stream(model="smol", input=ask, max_output_tokens=60, temperature=0) as stream:
        final = stream.get_final_response()
    assert final.output_text == r.output_text and final.usage.output_tokens == r.usage.output_tokens


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, param",
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"previous_response_id": 123}, "previous_response_id"),
        ({"store": "yes"}, "store"),
        ({"conversation": "conv_1"}, "conversation"),
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


@pytest.mark.slow
def test_an_unknown_model_is_a_404(oai):
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model="nope", input="Hi")


# -- the store: previous_response_id, GET and DELETE --------------------------------------------------


def test_previous_response_id_continues_the_stored_conversation(oai):
    first = oai.responses.create(
        model="smol", instructions="Be brief.", input="Name a colour.", max_output_tokens=8, temperature=0
    )
    assert first.store is True and first.previous_response_id is None
    second = oai.responses.create(
        model="smol", previous_response_id=first.id, input="Name another.", max_output_tokens=8, temperature=0
    )
    assert second.previous_response_id == first.id and second.output_text
    # the first turn's input and its answer are in the second prompt (its instructions are not, as OpenAI)
    alone = oai.responses.create(model="smol", input="Name another.", max_output_tokens=1, temperature=0)
    assert second.usage.input_tokens >= alone.usage.input_tokens + first.usage.output_tokens
    # the same conversation sent whole gives the same prompt
    whole = oai.responses.create(
        model="smol",
        input=[
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "Name another."},
        ],
        max_output_tokens=8,
        temperature=0,
    )
    assert whole.usage.input_tokens == second.usage.input_tokens and whole.output_text == second.output_text


def test_a_streamed_function_call_is_answered_through_previous_response_id(oai):
    with oai.responses.stream(
        model="smol",
        input=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=80,
        temperature=0,
    ) as stream:
        final = stream.get_final_response()
    calls = [item for item in final.output if item.type == "function_call"]
    assert calls and final.status == "completed"
    results = [
        {"type": "function_call_output", "call_id": c.call_id, "output": json.dumps({"temperature": 21})} for c in calls
    ]
    with oai.responses.stream(
        model="smol", previous_response_id=final.id, input=results, tools=TOOLS, max_output_tokens=120, temperature=0
    ) as stream:
        follow = stream.get_final_response()  # only a response.completed event ends it
    assert follow.status == "completed" and follow.output and follow.previous_response_id == final.id
    assert follow.usage.input_tokens > final.usage.input_tokens + final.usage.output_tokens - 1


def test_retrieve_and_delete(oai, smol_server):
    r = oai.responses.create(model="smol", input="Say yes.", max_output_tokens=4, temperature=0)
    got = oai.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.usage.output_tokens == r.usage.output_tokens
    headers = {"Authorization": f"Bearer {KEY}"}
    gone = httpx.delete(f"{smol_server.url}/v1/responses/{r.id}", headers=headers, timeout=30)
    assert gone.status_code == 200 and gone.json() == {"id": r.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError) as err:
        oai.responses.retrieve(r.id)
    assert err.value.body["code"] == "not_found" and r.id in err.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        oai.responses.delete(r.id)
    with pytest.raises(openai.BadRequestError) as err:
        oai.responses.create(model="smol", previous_response_id=r.id, input="Again.")
    assert err.value.body["param"] == "previous_response_id" and r.id in err.value.body["message"]


def test_store_false_keeps_nothing(oai):
    r = oai.responses.create(model="smol", input="Say yes.", max_output_tokens=2, temperature=0, store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(r.id)
    with oai.responses.stream(model="smol", input="Say yes.", max_output_tokens=2, store=False) as stream:
        streamed = list(stream)[-1].response  # response.incomplete: cut short
    assert streamed.store is False
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(streamed.id)


class City(BaseModel):
    name: str
    population: int
    capital: bool


def test_parse_returns_the_pydantic_object(oai):
    r = oai.responses.parse(
        model="smol",
        input=[{"role": "user", "content": "Describe Paris as JSON."}],
        text_format=City,
        max_output_tokens=120,
        temperature=0.8,
        extra_body={"seed": 3},
    )
    assert isinstance(r.output_parsed, City) and r.output_parsed.name


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    """A tiny model that opens a <think> span, writes x, closes it, answers y and ends its turn."""
    root = tmp_path_factory.mktemp("thinker")
    chain = [
        ("\n", "<think>"),
        ("<think>", "x"),
        ("x", "</think>"),
        ("</think>", "\n\n"),
        ("\n\n", "y"),
        ("y", "<|im_end|>"),
    ]
    write_bigram_model(root / "model", chain)
    srv = Server(root, tiny_models_toml(root / "model", "max_context = 256"))
    try:
        srv.wait_healthy()
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
    finally:
        srv.stop()


def test_usage_counts_the_reasoning_tokens(thinker):
    """<think>, x and </think> are reasoning; the blank line, y and the end of the turn are not."""
    r = thinker.responses.create(model="tiny", input="Hi", max_output_tokens=20)
    assert [item.type for item in r.output] == ["reasoning", "message"] and r.status == "completed"
    assert r.output[0].content[0].text == "x" and r.output_text == "y"
    assert r.usage.output_tokens == 6 and r.usage.output_tokens_details.reasoning_tokens == 3
    with thinker.responses.stream(model="tiny", input="Hi", max_output_tokens=20) as stream:
        streamed = stream.get_final_response()
    assert streamed.output_text == "y" and streamed.usage.output_tokens_details == r.usage.output_tokens_details


BOGUS = {"type": "bogus"}


@pytest.mark.parametrize(
    "endpoint, body, param",
    [
        (
            "responses",
            {"text": {"format": {"type": "json_schema", "name": "x", "schema": BOGUS}}},
            "text.format.schema",
        ),
        ("responses", {"tools": [{"type": "function", "name": "f", "parameters": BOGUS}]}, "tools[0].parameters"),
        (
            "chat",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": BOGUS}}},
            "response_format.json_schema.schema",
        ),
        (
            "chat",
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": BOGUS}}]},
            "tools[0].function.parameters",
        ),
    ],
    ids=["text.format", "responses-tool", "response_format", "chat-tool"],
)
def test_a_schema_the_grammar_engine_cannot_read_is_a_400_naming_it(thinker, endpoint, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        if endpoint == "responses":
            thinker.responses.create(model="tiny", input="Hi", max_output_tokens=2, **body)
        else:
            thinker.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, **body
            )
    assert e.value.body["param"] == param
    assert e.value.body["message"] == f"Invalid schema in '{param}': Invalid type: bogus"  # no grammar internals


def test_a_keyword_the_grammar_engine_cannot_enforce_is_no_400(thinker):
    lax = {"type": "object", "properties": {"mail": {"type": "string", "format": "no-such-format"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": lax}}
    r = thinker.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, response_format=fmt
    )
    assert r.choices[0].finish_reason == "length"


@pytest.fixture(scope="module")
def bounded_server(tmp_path_factory, tiny_qwen3):
    root = tmp_path_factory.mktemp("bounded")
    srv = Server(root, tiny_models_toml(tiny_qwen3, "max_context = 256"), "responses_store_max = 3\n")
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


def test_the_store_never_grows_past_its_bound(bounded_server):
    client = openai.OpenAI(base_url=bounded_server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    ids = [client.responses.create(model="tiny", input="Hi", max_output_tokens=2).id for _ in range(5)]
    db = sqlite3.connect(bounded_server.root / "run" / "responses.sqlite3")
    try:
        assert [row[0] for row in db.execute("SELECT id FROM responses ORDER BY seq")] == ids[2:]
    finally:
        db.close()
    for old in ids[:2]:  # oldest first out
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(old)
    assert client.responses.retrieve(ids[-1]).id == ids[-1]
    r = httpx.get(f"{bounded_server.url}/v1/responses/resp_nope", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


# -- the store alone ------------------------------------------------------------------------------------


def test_expired_entries_are_gone(tmp_path):
    store = ResponseStore(str(tmp_path / "r.sqlite3"), max_entries=10, ttl_s=1)
    store.put("resp_a", {"id": "resp_a"}, [{"role": "user", "content": "hi"}])
    assert store.get("resp_a") == ({"id": "resp_a"}, [{"role": "user", "content": "hi"}])
    time.sleep(1.2)
    assert store.get("resp_a") is None and not store.delete("resp_a")
    store.put("resp_b", {"id": "resp_b"}, [])
    assert store.count() == 1  # each write drops the expired rows


def test_a_stored_response_is_its_api_keys_alone(tmp_path):
    """Another key neither finds, continues nor deletes it: a 404, as for an unknown id."""
    store = ResponseStore(str(tmp_path / "r.sqlite3"), max_entries=10)
    alice, bob = key_id("sk-alice"), key_id("sk-bob")
    store.put("resp_a", {"id": "resp_a"}, [{"role": "user", "content": "secret"}], alice)
    assert store.get("resp_a", bob) is None and store.get("resp_a") is None
    assert not store.delete("resp_a", bob)
    assert store.get("resp_a", alice)[1] == [{"role": "user", "content": "secret"}]
    assert store.delete("resp_a", alice)


def test_max_zero_is_off(tmp_path):
    store = ResponseStore(str(tmp_path / "r.sqlite3"), max_entries=0)
    store.put("resp_a", {"id": "resp_a"}, [])
    assert store.get("resp_a") is None and not store.enabled


def _write(path: str, worker: int, n: int) -> None:
    store = ResponseStore(path, max_entries=50)
    for i in range(n):
        store.put(f"resp_{worker}_{i}", {"id": i}, [])


def test_processes_share_the_store_and_its_bound(tmp_path):
    path = str(tmp_path / "r.sqlite3")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write, args=(path, w, 40)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = ResponseStore(path, max_entries=50)
    assert store.count() == 50  # 120 written by 3 processes, the newest 50 kept
    assert any(store.get(f"resp_{w}_39") is not None for w in range(3))
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reasoning_items_go_back_to_the_model_with_the_turn_they_precede():
    """A reasoning item sent back (a tool loop continued by hand) becomes the reasoning of the
    assistant turn after it, which the model's template shows it again within the loop."""
    from cortex.api.response_items import parse_items

    items = [
        {"type": "message", "role": "user", "content": "Weather in Paris?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Ask."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "reasoning", "id": "rs_2", "summary": [{"type": "summary_text", "text": "It is sunny."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sunny."}]},
    ]
    messages = parse_items(items, "input")
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[1]["reasoning_content"] == "Ask." and messages[1]["tool_calls"][0]["id"] == "c1"
    assert messages[3] == {"role": "assistant", "content": "Sunny.", "reasoning_content": "It is sunny."}
    bad = [{"type": "reasoning", "content": "not a list"}]
    with pytest.raises(Exception, match="input\\[0\\].content"):
        parse_items(bad, "input")

"""Custom (free-form) tools in the Responses API, driven by the official SDK against SmolLM2: the
call comes back as a ``custom_tool_call`` item holding raw text, streamed as
``response.custom_tool_call_input.delta`` / ``.done``; the call and its ``custom_tool_call_output``
are accepted on the next turn, sent whole or through ``previous_response_id``. A regex grammar
constrains the input; a lark grammar is a 400 naming it."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from tests.conftest import SMOL_KEY as KEY

ASK = [{"role": "user", "content": "Book me a table for tonight, please."}]
CODE = r"[A-Z]{3}-[0-9]{4}"
BOOK = {
    "type": "custom",
    "name": "book_table",
    "description": "Books a table; its input is the reservation code.",
    "format": {"type": "grammar", "syntax": "regex", "definition": CODE},
}
SHELL = {"type": "custom", "name": "shell", "description": "Runs one short shell command.", "format": {"type": "text"}}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def oai(smol_server):
    return openai.OpenAI(base_url=smol_server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_a_regex_custom_tool_call_is_raw_text_that_matches_it_whole(oai):
    r = oai.responses.create(
        model="smol",
        input=ASK,
        tools=[BOOK, WEATHER],
        tool_choice={"type": "custom", "name": "book_table"},
        max_output_tokens=60,
        temperature=0,
    )
    calls = [item for item in r.output if item.type == "custom_tool_call"]
    assert calls and r.status == "completed", r.output
    for call in calls:
        assert call.name == "book_table" and call.call_id.startswith("call_")
        assert re.fullmatch(CODE, call.input), call.input  # the text itself, not JSON around it
    assert not [item for item in r.output if item.type == "function_call"]

    # the call and its output on the next turn, sent whole ...
    results = [{"type": "custom_tool_call_output", "call_id": c.call_id, "output": "Booked for 8 pm."} for c in calls]
    follow = oai.responses.create(
        model="smol",
        input=[*ASK, *[c.model_dump(exclude_none=True) for c in calls], *results],
        tools=[BOOK, WEATHER],
        max_output_tokens=40,
        temperature=0,
    )
    assert follow.output and follow.usage.input_tokens > r.usage.input_tokens
    # ... or through the stored response: the same prompt
    stored = oai.responses.create(
        model="smol",
        previous_response_id=r.id,
        input=results,
        tools=[BOOK, WEATHER],
        max_output_tokens=40,
        temperature=0,
    )
    assert stored.usage.input_tokens == follow.usage.input_tokens
    assert [(i.type, getattr(i, "input", None)) for i in stored.output] == [
        (i.type, getattr(i, "input", None)) for i in follow.output
    ]


def test_a_streamed_custom_tool_call_sends_its_input_events(oai):
    with oai.responses.stream(
        model="smol",
        input=[{"role": "user", "content": "List the files in this directory."}],
        tools=[SHELL],
        tool_choice={"type": "custom", "name": "shell"},
        max_output_tokens=120,
        temperature=0,
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    calls = [item for item in final.output if item.type == "custom_tool_call"]
    assert calls and final.status == "completed", final.output
    deltas = "".join(e.delta for e in events if e.type == "response.custom_tool_call_input.delta")
    done = [e.input for e in events if e.type == "response.custom_tool_call_input.done"]
    assert done == [c.input for c in calls] and deltas == "".join(done)
    assert all(c.name == "shell" and isinstance(c.input, str) and c.input for c in calls)
    added = [e.item for e in events if e.type == "response.output_item.added" and e.item.type == "custom_tool_call"]
    assert [a.id for a in added] == [c.id for c in calls]
    assert [e.sequence_number for e in events] == list(range(len(events)))


@pytest.mark.parametrize(
    "tools, choice, param",
    [
        (
            [{**BOOK, "format": {"type": "grammar", "syntax": "lark", "definition": "start: /a+/"}}],
            None,
            "format.syntax",
        ),
        ([{**BOOK, "format": {"type": "grammar", "syntax": "regex"}}], None, "format.definition"),
        ([{**BOOK, "format": {"type": "xml"}}], None, "format.type"),
        ([BOOK, {**SHELL, "name": "book_table"}], None, "tools[1].name"),
        ([BOOK], {"type": "function", "name": "book_table"}, "tool_choice"),
        ([WEATHER], {"type": "custom", "name": "get_weather"}, "tool_choice"),
        (
            [{**BOOK, "format": {"type": "grammar", "syntax": "regex", "definition": "("}}],
            {"type": "custom", "name": "book_table"},
            "tools[0].format.definition",
        ),
    ],
    ids=["lark", "no-definition", "format", "twice", "choice-kind", "choice-kind-2", "bad-regex"],
)
def test_what_cannot_be_served_is_a_400_naming_the_field(smol_server, tools, choice, param):
    body = {"model": "smol", "input": "Hi", "tools": tools, **({"tool_choice": choice} if choice else {})}
    r = httpx.post(smol_server.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].endswith(param), err
    if param == "format.syntax":
        assert "'lark'" in err["message"] and "regex" in err["message"], err
    if param == "tools[0].format.definition":  # the regex's error alone, not the grammar it was put in
        assert err["param"] == param and err["message"].startswith(f"Invalid regex in '{param}': regex parse error:")
        assert "unclosed group" in err["message"] and "start:" not in err["message"] and "^(?:" not in err["message"]

"""Request bodies are declared once (cortex/api/bodies.py): the decoder and /openapi.json's request
schemas both come from that declaration, and a bad field is still the API's clear 400 naming it."""

from __future__ import annotations

import json
from typing import get_args

import falcon.testing
import msgspec
import pytest

from cortex.api import bodies
from cortex.api.errors import ApiError
from cortex.api.openapi import document
from cortex.api.validation import decode

HI = [{"role": "user", "content": "hi"}]
VALID = {
    bodies.ChatCompletionRequest: {"model": "m", "messages": HI},
    bodies.CompletionRequest: {"model": "m", "prompt": "hi"},
    bodies.AnthropicMessagesRequest: {"model": "m", "max_tokens": 1, "messages": HI},
    bodies.AnthropicCountTokensRequest: {"model": "m", "messages": HI},
    bodies.ModelName: {"model": "m"},
}
ROUTES = {
    "/v1/chat/completions": bodies.ChatCompletionRequest,
    "/v1/completions": bodies.CompletionRequest,
    "/v1/messages": bodies.AnthropicMessagesRequest,
    "/v1/messages/count_tokens": bodies.AnthropicCountTokensRequest,
    "/models/load": bodies.ModelName,
}


def _decode(cls: type, body: dict | bytes):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = falcon.testing.create_req(method="POST", body=raw, headers={"content-type": "application/json"})
    return decode(req, cls, 1 << 20)


def _error(cls: type, body: dict | bytes) -> ApiError:
    with pytest.raises(ApiError) as e:
        _decode(cls, body)
    return e.value


def _bounded_fields():
    """(class, field, the non-null member's type info) for every top-level field with bounds or an enum."""
    for cls in VALID:
        for f in msgspec.inspect.type_info(cls).fields:
            for t in _members(f.type):
                numbers = (msgspec.inspect.IntType, msgspec.inspect.FloatType)
                bounded = isinstance(t, numbers) and (t.ge, t.le) != (None, None)
                if bounded or isinstance(t, msgspec.inspect.LiteralType):
                    yield cls, f.name, t


def _members(t: msgspec.inspect.Type) -> list[msgspec.inspect.Type]:
    while isinstance(t, msgspec.inspect.Metadata):
        t = t.type
    return [m for u in t.types for m in _members(u)] if isinstance(t, msgspec.inspect.UnionType) else [t]


BOUNDED = list(_bounded_fields())


def _property(cls: type, name: str) -> list[dict]:
    """The document's schema of a request field: its alternatives (null left out)."""
    prop = document()["components"]["schemas"][cls.__name__]["properties"][name]
    return [s for s in prop.get("anyOf", [prop]) if s.get("type") != "null"]


def test_every_field_with_bounds_or_an_enum_is_checked():
    names = {(cls.__name__, name) for cls, name, _ in BOUNDED}
    assert ("ChatCompletionRequest", "temperature") in names and ("AnthropicMessagesRequest", "temperature") in names
    assert ("ChatCompletionRequest", "reasoning_effort") in names and ("CompletionRequest", "logprobs") in names
    assert len(names) >= 30, sorted(names)


@pytest.mark.parametrize(("cls", "name", "info"), BOUNDED, ids=[f"{c.__name__}.{n}" for c, n, _ in BOUNDED])
def test_the_document_states_the_bounds_the_decoder_enforces(cls, name, info):
    schemas, base = _property(cls, name), VALID[cls]
    if isinstance(info, msgspec.inspect.LiteralType):
        assert any(set(s.get("enum", ())) == set(info.values) for s in schemas), schemas
        for value in info.values:
            assert getattr(_decode(cls, {**base, name: value}), name) == value
        bad = "not-one-of-them" if isinstance(info.values[0], str) else 12345
        assert _error(cls, {**base, name: bad}).param == name
        return
    kind = "integer" if isinstance(info, msgspec.inspect.IntType) else "number"
    schema = next(s for s in schemas if s.get("type") == kind)
    assert (schema.get("minimum"), schema.get("maximum")) == (info.ge, info.le)
    step = 1 if kind == "integer" else 0.25
    for edge, beyond, words in ((info.ge, -step, "minimum"), (info.le, step, "maximum")):
        if edge is None:
            continue
        assert getattr(_decode(cls, {**base, name: edge}), name) == edge
        err = _error(cls, {**base, name: edge + beyond})
        assert (err.status, err.param, err.code) == (400, name, "invalid_value")
        assert f"the {words} of {edge}." in err.message or "does not fit in a 64-bit integer" in err.message


def test_a_constraint_changed_in_the_declaration_changes_the_decoder_and_the_schema():
    class Cooler(bodies.ChatCompletionRequest, kw_only=True):
        temperature: bodies.opt(bodies.num(0, 1.5)) = 1.0

    (ref,), components = msgspec.json.schema_components([Cooler], ref_template="#/{name}")
    prop = components["Cooler"]["properties"]["temperature"]["anyOf"][0]
    assert (prop["minimum"], prop["maximum"]) == (0, 1.5)
    assert _decode(Cooler, {**VALID[bodies.ChatCompletionRequest], "temperature": 1.5}).temperature == 1.5
    err = _error(Cooler, {**VALID[bodies.ChatCompletionRequest], "temperature": 1.75})
    assert err.message == "Invalid value for 'temperature': 1.75 is greater than the maximum of 1.5."
    assert _decode(bodies.ChatCompletionRequest, {**VALID[bodies.ChatCompletionRequest], "temperature": 1.75})


@pytest.mark.parametrize("path", ROUTES)
def test_each_request_body_in_the_document_is_the_type_its_resource_decodes(path):
    doc = document()
    op = next(iter(doc["paths"][path].values()))
    cls = ROUTES[path]
    assert op["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": f"#/components/schemas/{cls.__name__}"
    }
    (_,), made = msgspec.json.schema_components([cls], ref_template="#/components/schemas/{name}")
    assert doc["components"]["schemas"][cls.__name__]["properties"] == made[cls.__name__]["properties"]


CHAT = bodies.ChatCompletionRequest
MESSAGES = bodies.AnthropicMessagesRequest


@pytest.mark.parametrize(
    ("cls", "extra", "message", "param"),
    [
        (CHAT, {"model": None}, "Missing required parameter: 'model'.", "model"),
        (
            CHAT,
            {"temperature": "hot"},
            "Invalid type for 'temperature': expected an integer or a number, but got a string.",
            "temperature",
        ),
        (
            CHAT,
            {"temperature": 9},
            "Invalid value for 'temperature': 9 is greater than the maximum of 2.",
            "temperature",
        ),
        (CHAT, {"n": True}, "Invalid type for 'n': expected an integer, but got a boolean.", "n"),
        (CHAT, {"seed": 2**64}, f"Invalid value for 'seed': {2**64} does not fit in a 64-bit integer.", "seed"),
        (CHAT, {"stop": 5}, "Invalid type for 'stop': expected a string or an array, but got an integer.", "stop"),
        (CHAT, {"stop": [1]}, "'stop' must be a string or an array of at most 4 strings.", "stop"),
        (CHAT, {"messages": []}, "'messages' must contain at least one message.", "messages"),
        (CHAT, {"messages": ["x"]}, "Invalid type for 'messages[0]': expected an object.", "messages[0]"),
        (
            CHAT,
            {"messages": [{"role": "wizard"}]},
            "Invalid value for 'messages[0].role': expected one of system, developer, user, assistant, tool.",
            "messages[0].role",
        ),
        (
            CHAT,
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "Content part type 'image_url' is not supported by this model.",
            "messages[0].content[0]",
        ),
        (
            CHAT,
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "Missing or invalid 'text' in 'messages[0].content[0]'.",
            "messages[0].content[0].text",
        ),
        (
            CHAT,
            {"logit_bias": {"5": 101}},
            "Invalid logit_bias value 101 for token 5: expected -100 to 100.",
            "logit_bias",
        ),
        (CHAT, {"logit_bias": {"x": 1}}, "'logit_bias' maps token ids to numbers between -100 and 100.", "logit_bias"),
        (
            CHAT,
            {"tools": [{"type": "function", "function": {}}]},
            "Invalid tool at 'tools[0]': expected a function with a name.",
            "tools[0]",
        ),
        (
            CHAT,
            {"tool_choice": "sometimes"},
            "'tool_choice' must be none, auto, required or a named function.",
            "tool_choice",
        ),
        (
            CHAT,
            {"response_format": {"type": "yaml"}},
            "Unknown response_format type 'yaml': expected text, json_object or json_schema.",
            "response_format",
        ),
        (bodies.CompletionRequest, {"prompt": None}, "Missing required parameter: 'prompt'.", "prompt"),
        (
            bodies.CompletionRequest,
            {"prompt": [1.5]},
            "Invalid 'prompt': expected a string or an array of token ids.",
            "prompt",
        ),
        (bodies.CompletionRequest, {"suffix": "x"}, "'suffix' is not supported.", "suffix"),
        (MESSAGES, {"max_tokens": None}, "Missing required parameter: 'max_tokens'.", "max_tokens"),
        (
            MESSAGES,
            {"messages": [{"role": "robot"}]},
            "messages.0.role: expected 'user', 'assistant' or 'system'.",
            "messages.0",
        ),
        (
            MESSAGES,
            {"messages": [{"role": "user", "content": [{"type": "video"}]}]},
            "messages.0.content.0: unexpected content block 'video' in a user message.",
            "messages.0.content.0",
        ),
        (
            MESSAGES,
            {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "input": {}}]}]},
            "messages.0.content.0: tool_use needs a name and an input object.",
            "messages.0.content.0",
        ),
        (
            MESSAGES,
            {"system": [{"type": "image"}]},
            "system.0: block type 'image' is not supported here; expected text.",
            "system.0",
        ),
        (
            MESSAGES,
            {"tools": [{"name": "t", "type": "bash_20250124"}]},
            "tools.0: server tool type 'bash_20250124' is not supported.",
            "tools.0",
        ),
        (
            MESSAGES,
            {"tool_choice": {"type": "tool", "name": 7}},
            "tool_choice.name: 7 is not one of the tools.",
            "tool_choice",
        ),
        (MESSAGES, {"thinking": {"type": "on"}}, "thinking.type: expected enabled, adaptive or disabled.", "thinking"),
        (
            MESSAGES,
            {"temperature": 1.5},
            "Invalid value for 'temperature': 1.5 is greater than the maximum of 1.",
            "temperature",
        ),
    ],
)
def test_a_bad_field_is_a_400_in_the_apis_words(cls, extra, message, param):
    err = _error(cls, {**VALID[cls], **extra})
    assert (err.status, err.message, err.param) == (400, message, param)
    assert err.code == ("missing_required_parameter" if message.startswith("Missing required") else "invalid_value")


def test_explicit_null_is_the_default_and_unknown_fields_are_ignored():
    body = _decode(CHAT, {**VALID[CHAT], "temperature": None, "n": None, "stream": None, "no_such_field": [1, {}]})
    assert (body.temperature, body.n, body.stream) == (1.0, 1, False)
    assert _decode(bodies.CompletionRequest, {**VALID[bodies.CompletionRequest], "max_tokens": None}).max_tokens == 16


def test_what_json_cannot_say_is_refused_and_what_python_reads_is_read():
    for word in ("NaN", "Infinity", "-Infinity"):
        err = _error(CHAT, b'{"model": "m", "messages": [], "top_p": ' + word.encode() + b"}")
        assert err.code == "invalid_json" and word in err.message
    assert _error(CHAT, b"[1]").message == "The request body must be a JSON object."
    utf16 = json.dumps(VALID[CHAT]).encode("utf-16")  # not msgspec's, but json's: the slow path reads it
    assert _decode(CHAT, utf16).model == "m"
    assert _error(CHAT, b'{"model": "m", "messages": [{"role": "user"}], "top_p": 1e400}').message == (
        "Invalid value for 'top_p': inf is greater than the maximum of 1."
    )


def test_the_documented_model_statuses_are_the_leaders():
    from cortex.api.replies import Status
    from cortex.models.registry import ModelStatus

    assert set(get_args(Status)) == {s.value for s in ModelStatus}

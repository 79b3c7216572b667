"""Every bad input a clear 4xx (issue 20): bodies, schemas and values a client can send that used to
answer 500, or 200 with nonsense, or were read wrong. Real HTTP against a real `cortex serve` where
the defect is the server's; unit tests where the part alone shows it."""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import httpx
import jsonschema
import openai
import pytest

from cortex.api.rawbody import MAX_JSON_DEPTH
from tests.conftest import Server, tiny_models_toml

HI = [{"role": "user", "content": "Hi"}]
CHAT, MESSAGES, COUNT = "/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens"

# a tool schema the way pydantic writes one: the nested models in $defs, referred to by $ref; only
# enums and booleans, so a forced call of a random model ends after a few dozen tokens
POINT = {
    "$defs": {
        "Unit": {"enum": ["c", "f"]},
        "Reading": {
            "type": "object",
            "properties": {"unit": {"$ref": "#/$defs/Unit"}, "ok": {"type": "boolean"}},
            "required": ["unit", "ok"],
        },
    },
    "type": "object",
    "properties": {"reading": {"$ref": "#/$defs/Reading"}, "again": {"$ref": "#/$defs/Unit"}},
    "required": ["reading", "again"],
}
# satisfiable only by an infinite value: every `a` must hold another `a`
ENDLESS = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_qwen3):
    """The tiny model with room for tools described in the system prompt; a 1 MiB body limit."""
    root = tmp_path_factory.mktemp("hostile")
    server = Server(root, tiny_models_toml(tiny_qwen3, "max_context = 2048"), "max_body_mb = 1\n")
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def oai(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(srv):
    return anthropic.Anthropic(base_url=srv.url, api_key="unused", max_retries=0, timeout=120)


def _post(srv, path: str, body: dict | None = None, **kw) -> httpx.Response:
    if body is not None:
        kw["json"] = body
    return httpx.post(srv.url + path, timeout=120, **kw)


def _openai_error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) >= {"message", "type", "param", "code"}, body
    return body["error"]


def _anthropic_error(r: httpx.Response) -> dict:
    body = r.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    return body["error"]


def _nested(depth: int, leaf=None):
    """``depth`` arrays, one in another."""
    out = [] if leaf is None else leaf
    for _ in range(depth - 1):
        out = [out]
    return out


def _deep_schema(levels: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


# -- 1. a forced tool whose schema uses $defs / $ref -------------------------------------------------------


def _walk(constraint, tok, eos: int, steps: int = 400) -> str:
    """Take the last allowed token at every step (adversarial), then the end as soon as it is allowed."""
    import torch

    from cortex.chat.tokenizer import token_bytes
    from workers.sampling import allowed_mask

    out: list[int] = []
    for _ in range(steps):
        allowed = allowed_mask(constraint.mask(), tok.get_vocab_size(), torch.device("cpu")).nonzero().flatten()
        allowed = allowed.tolist()
        if eos in allowed:
            break
        constraint.advance(allowed[-1], token_bytes(tok, allowed[-1]))
        out.append(allowed[-1])
    return tok.decode(out, skip_special_tokens=False)


@pytest.fixture(scope="module")
def tok_grammars(tmp_path_factory):
    from tokenizers import Tokenizer

    from cortex.engine.constraint import Grammars
    from tests.conftest import train_tiny_tokenizer

    path = tmp_path_factory.mktemp("tok")
    train_tiny_tokenizer(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")
    return tok, eos, Grammars(tok, tok.get_vocab_size(), [eos])


@pytest.mark.parametrize("mode", ["required", "auto"])
def test_tool_schemas_with_defs_and_refs_compile_for_every_tool(tok_grammars, mode):
    """The call grammar wraps each tool's schema: its refs must still point into that schema, also
    with several tools, legacy ``definitions`` and a ref to the tool's own root."""
    from cortex.engine.constraint import Rules

    tok, eos, grammars = tok_grammars
    legacy = {
        "definitions": {"Flag": {"type": "boolean"}},
        "type": "object",
        "properties": {"flag": {"$ref": "#/definitions/Flag"}, "next": {"$ref": "#"}},
        "required": ["flag"],
    }
    tools = [{"name": "point", "parameters": POINT}, {"name": "flag", "parameters": legacy}]
    constraint = grammars.constraint(Rules(tools=tools, tool_mode=mode, parallel=False))
    if mode == "auto":
        return  # compiled (a bad schema raises here); the body is the forced grammar's
    text = _walk(constraint, tok, eos)
    call = json.loads(text.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))
    jsonschema.validate(call["arguments"], {"point": POINT, "flag": legacy}[call["name"]])


def test_a_forced_tool_with_defs_and_refs_returns_a_valid_call(oai, claude):
    tool = {"type": "function", "function": {"name": "read", "description": "A reading", "parameters": POINT}}
    r = oai.chat.completions.create(
        model="tiny",
        messages=HI,
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "read"}},
        parallel_tool_calls=False,
        max_tokens=400,
    )
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "read" and r.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), POINT)
    m = claude.messages.create(
        model="tiny",
        max_tokens=400,
        messages=HI,
        tools=[{"name": "read", "description": "A reading", "input_schema": POINT}],
        tool_choice={"type": "tool", "name": "read", "disable_parallel_tool_use": True},
    )
    (use,) = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "read" and m.stop_reason == "tool_use"
    jsonschema.validate(use.input, POINT)


# -- 2. JSON nested too deep -----------------------------------------------------------------------------


DEEP = "__deep__"


def _with_deep(body: dict, depth: int = 1000) -> dict:
    """``body`` as JSON bytes, with ``depth`` nested arrays where it says DEEP (Python's json, and so
    the SDKs and httpx's ``json=``, cannot write nesting that deep)."""
    raw = json.dumps(body).replace(json.dumps(DEEP), "[" * depth + "]" * depth)
    return {"content": raw.encode(), "headers": {"content-type": "application/json"}}


def test_a_body_nested_a_thousand_deep_is_a_400_in_each_dialect(srv):
    r = _post(srv, CHAT, **_with_deep({"model": "tiny", "messages": HI, "max_tokens": 2, "extra": DEEP}))
    assert r.status_code == 400, r.text
    err = _openai_error(r)
    assert str(MAX_JSON_DEPTH) in err["message"] and err["param"] == "extra"
    for path in (MESSAGES, COUNT):
        body = {"model": "tiny", "messages": HI, "max_tokens": 2, "metadata": {"x": DEEP}}
        r = _post(srv, path, **_with_deep(body))
        assert r.status_code == 400, r.text
        err = _anthropic_error(r)
        assert err["type"] == "invalid_request_error" and str(MAX_JSON_DEPTH) in err["message"]
        assert "metadata" in err["message"]
    r = _post(srv, "/models/load", **_with_deep({"model": DEEP}))
    assert r.status_code == 400 and str(MAX_JSON_DEPTH) in _openai_error(r)["message"]


def test_a_body_as_deep_as_the_limit_is_read():
    """Exactly the limit is fine, one more is not; brackets inside strings are no nesting."""
    import falcon.testing

    from cortex.api import bodies
    from cortex.api.errors import ApiError
    from cortex.api.validation import decode

    def read(extra) -> bodies.ChatCompletionRequest:
        raw = json.dumps({"model": "m", "messages": HI, "chat_template_kwargs": extra}).encode()
        return decode(falcon.testing.create_req(method="POST", body=raw), bodies.ChatCompletionRequest, 1 << 20)

    assert read({"x": _nested(MAX_JSON_DEPTH - 2)}).chat_template_kwargs  # body + kwargs + the arrays
    with pytest.raises(ApiError) as e:
        read({"x": _nested(MAX_JSON_DEPTH - 1)})
    assert e.value.status == 400 and e.value.param == "chat_template_kwargs"
    assert read({"x": "[" * 500 + '"{' * 100, "y": "\\", "z": '\\"[[['}).chat_template_kwargs
    with pytest.raises(ApiError) as e:  # a string that ends in a backslash ends all the same
        read({"y": "\\", "z": {"a": [_nested(MAX_JSON_DEPTH)]}})
    assert e.value.param == "chat_template_kwargs"
    body = {"model": "m", "messages": HI, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}
    raw = json.dumps(body).replace("{}", json.dumps(_deep_schema(40))).encode("utf-16")  # Python's json reads it
    with pytest.raises(ApiError) as e:
        decode(falcon.testing.create_req(method="POST", body=raw), bodies.ChatCompletionRequest, 1 << 20)
    assert e.value.param == "tools[0].function.parameters"


# -- 3. schemas, tool parameters and template kwargs too deep for the leader's wire -----------------------


def test_too_deep_schemas_tools_and_template_kwargs_are_a_400_naming_the_limit(srv):
    deep = _deep_schema(300)
    fmt = {"type": "json_schema", "json_schema": {"name": "deep", "schema": deep}}
    cases = [
        (CHAT, {"response_format": fmt}, "response_format.json_schema.schema"),
        (CHAT, {"tools": [{"type": "function", "function": {"name": "f", "parameters": deep}}]}, None),
        (CHAT, {"chat_template_kwargs": {"x": _deep_schema(150)}}, "chat_template_kwargs"),
        (MESSAGES, {"tools": [{"name": "f", "input_schema": deep}]}, None),
    ]
    for path, extra, param in cases:
        r = _post(srv, path, {"model": "tiny", "messages": HI, "max_tokens": 2, **extra})
        assert r.status_code == 400, r.text
        err = _openai_error(r) if path == CHAT else _anthropic_error(r)
        assert str(MAX_JSON_DEPTH) in err["message"], err
        if param is not None:
            assert err["param"] == param
    r = _post(srv, CHAT, {"model": "tiny", "messages": HI, "max_tokens": 2, "tools": cases[1][1]["tools"]})
    assert _openai_error(r)["param"] == "tools[0].function.parameters"
    r = _post(srv, MESSAGES, {"model": "tiny", "messages": HI, "max_tokens": 2, "tools": cases[3][1]["tools"]})
    assert "tools.0.input_schema" in _anthropic_error(r)["message"]


def test_the_depth_limit_leaves_room_on_the_wire_to_the_leader():
    """A body at the limit encodes as a Submit (the front) and decodes back (the leader), with the
    stack a thread already has in use."""
    from rpc.codec import decode, encode
    from rpc.engine import Submit
    from rpc.messages import SamplingParams

    schema = {"default": _nested(MAX_JSON_DEPTH)}
    sub = Submit("r", "m", HI, SamplingParams(), json_schema=schema, template_kwargs={"x": schema})

    def deep_in_the_stack(n: int) -> bool:
        return deep_in_the_stack(n - 1) if n else decode(encode(sub))[1] == sub

    assert deep_in_the_stack(300)


# -- 4. a schema no finite value satisfies ---------------------------------------------------------------


def test_finite_tells_the_schemas_no_finite_value_fits():
    from cortex.engine.constraint import finite

    assert not finite(ENDLESS)
    assert not finite({"type": "array", "items": {"$ref": "#"}, "minItems": 1})
    assert not finite(
        {"$defs": {"A": {"$ref": "#/$defs/B"}, "B": {"allOf": [{"$ref": "#/$defs/A"}]}}, "$ref": "#/$defs/A"}
    )
    assert not finite({"anyOf": [ENDLESS, {"type": "array", "items": False, "minItems": 1}]})
    assert not finite({"type": "object", "properties": {"x": False}, "required": ["x"]})
    # recursive, but each has a way out
    tree = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}, "required": ["kids"]}
    assert finite(tree)
    assert finite({"type": ["object", "null"], "properties": {"a": {"$ref": "#"}}, "required": ["a"]})
    assert finite({"properties": {"a": {"$ref": "#"}}, "required": ["a"]})  # a string passes: no type given
    assert finite({"anyOf": [ENDLESS, {"type": "string"}]})
    assert finite({"type": "object", "properties": {"a": {"$ref": "#"}}})  # a is optional
    a_or_b = {
        "$defs": {
            "A": {"anyOf": [{"$ref": "#/$defs/B"}, {"type": "integer"}]},
            "B": {**ENDLESS, "properties": {"a": {"$ref": "#/$defs/A"}}},
        },
        "$ref": "#/$defs/B",
    }
    assert finite(a_or_b)  # B needs an A, and an A can be an integer
    assert finite({"$ref": "#/$defs/missing"})  # not ours to judge: the compiler names it
    assert finite(POINT) and finite({})


def test_an_unsatisfiable_recursive_schema_is_a_400(srv, oai, claude):
    fmt = {"type": "json_schema", "json_schema": {"name": "endless", "schema": ENDLESS}}
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny", messages=HI, max_tokens=8, response_format=fmt)
    assert "finite" in e.value.body["message"]
    tool = {"type": "function", "function": {"name": "f", "parameters": ENDLESS}}
    for choice in ({"type": "function", "function": {"name": "f"}}, "auto", "required"):
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(model="tiny", messages=HI, max_tokens=8, tools=[tool], tool_choice=choice)
        assert "'f'" in e.value.body["message"] and "finite" in e.value.body["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(
            model="tiny",
            max_tokens=8,
            messages=HI,
            tools=[{"name": "f", "input_schema": ENDLESS}],
            tool_choice={"type": "tool", "name": "f"},
        )
    assert "finite" in e.value.body["error"]["message"]
    # a recursive schema with a way out is served
    tree = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}, "maxItems": 1}}}
    ok = {"type": "json_schema", "json_schema": {"name": "tree", "schema": tree}}
    r = oai.chat.completions.create(model="tiny", messages=HI, max_tokens=4, response_format=ok)
    assert r.choices[0].finish_reason in ("length", "stop")


# -- 5. chat_template_kwargs that set what the renderer passes itself ------------------------------------


@pytest.mark.parametrize("key", ["tools", "messages", "add_generation_prompt", "bos_token", "eos_token"])
def test_template_kwargs_that_set_a_reserved_name_are_a_400_naming_it(srv, key):
    r = _post(srv, CHAT, {"model": "tiny", "messages": HI, "max_tokens": 2, "chat_template_kwargs": {key: []}})
    assert r.status_code == 400, r.text
    err = _openai_error(r)
    assert err["param"] == "chat_template_kwargs" and f"'{key}'" in err["message"]


def test_the_leader_refuses_reserved_template_kwargs_itself():
    """A Submit from anywhere (a peer, a direct engine client): refused, not a TypeError."""
    from cortex.chat.template import CHATML, ChatTemplate
    from cortex.engine.constraint import Rules
    from cortex.engine.prepare import prompt_ids
    from rpc.engine import Submit
    from rpc.messages import SamplingParams

    class Files:
        template = ChatTemplate(CHATML)
        tokenizer = None

    sub = Submit("r", "m", HI, SamplingParams(), template_kwargs={"tools": []})
    with pytest.raises(ValueError, match="'tools'"):
        prompt_ids(Files(), sub, Rules())


def test_template_kwargs_of_other_names_still_reach_the_template(srv):
    r = _post(srv, CHAT, {"model": "tiny", "messages": HI, "max_tokens": 2, "chat_template_kwargs": {"x": 1}})
    assert r.status_code == 200, r.text


# -- 6. a chunked request body ---------------------------------------------------------------------------


def _chunks(data: bytes, size: int = 4096):
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_a_chunked_body_is_read(srv):
    body = json.dumps({"model": "tiny", "messages": HI, "max_tokens": 3, "ignore_eos": True}).encode()
    r = _post(srv, CHAT, content=_chunks(body, 7), headers={"content-type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


def test_a_chunked_body_over_the_limit_is_a_413(srv):
    big = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}).encode()
    r = _post(srv, CHAT, content=_chunks(big), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    assert _openai_error(r)["code"] == "request_too_large"
    r = _post(srv, MESSAGES, content=_chunks(big), headers={"content-type": "application/json"})
    assert r.status_code == 413 and _anthropic_error(r)["type"] == "request_too_large"


# -- 7. lone surrogates ----------------------------------------------------------------------------------


def test_a_lone_surrogate_is_a_400_naming_the_field(srv):
    raw = b'{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi \\ud800 there"}]}'
    r = _post(srv, CHAT, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = _openai_error(r)
    assert err["param"] == "messages[0].content" and "surrogate" in err["message"]
    r = _post(srv, MESSAGES, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "messages.0.content" in _anthropic_error(r)["message"]
    # as raw UTF-8 bytes of a surrogate (Python's json reads those too), and in a key
    raw = b'{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi \xed\xa0\x80"}]}'
    err = _openai_error(_post(srv, CHAT, content=raw, headers={"content-type": "application/json"}))
    assert err["param"] == "messages[0].content"
    raw = b'{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], '
    raw += b'"metadata": {"\\udfff": 1}}'
    r = _post(srv, MESSAGES, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "metadata" in _anthropic_error(r)["message"]
    # a pair is one character, and fine
    raw = b'{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi \\ud83d\\ude00"}]}'
    assert _post(srv, CHAT, content=raw, headers={"content-type": "application/json"}).status_code == 200


# -- 8. a logit_bias token past the vocabulary -----------------------------------------------------------


def test_a_logit_bias_token_outside_the_vocabulary_is_a_400(srv, tiny_qwen3):
    from cortex.chat.tokenizer import from_hf_dir

    vocab = from_hf_dir(tiny_qwen3).vocab_size
    for path, extra in ((CHAT, {"messages": HI}), ("/v1/completions", {"prompt": "Hi"})):
        r = _post(srv, path, {"model": "tiny", "max_tokens": 2, "logit_bias": {str(vocab): 5}, **extra})
        assert r.status_code == 400, r.text
        assert "logit_bias" in _openai_error(r)["message"] and str(vocab) in _openai_error(r)["message"]
        r = _post(srv, path, {"model": "tiny", "max_tokens": 2, "logit_bias": {str(vocab - 1): 5}, **extra})
        assert r.status_code == 200, r.text


# -- 9. the management API takes model_id too -----------------------------------------------------------


def test_management_takes_model_or_model_id(srv):
    from cortex.api.openapi import document

    for key in ("model", "model_id"):
        for op in ("pin", "unpin", "load"):
            r = _post(srv, f"/models/{op}", {key: "tiny"})
            assert r.status_code == 200, r.text
            assert r.json()["model"]["id"] == "tiny"
    r = _post(srv, "/models/load", {})
    assert r.status_code == 400 and _openai_error(r)["param"] == "model"
    r = _post(srv, "/models/load", {"model": "tiny", "model_id": "other"})
    assert r.status_code == 400 and _openai_error(r)["param"] == "model_id"
    r = _post(srv, "/models/load", {"model_id": 5})
    assert r.status_code == 400 and _openai_error(r)["param"] == "model_id"
    schema = document()["components"]["schemas"]["ModelName"]
    assert {"model", "model_id"} <= set(schema["properties"])
    assert [alternative["required"] for alternative in schema["anyOf"]] == [["model"], ["model_id"]]


# -- 10. count_tokens in the request log ----------------------------------------------------------------


def test_count_tokens_is_in_the_request_log_and_counted(srv, claude):
    from tests.conftest import scrape, value, wait_for

    def counted() -> float:
        return value(scrape(srv.metrics_url), "cortex_requests_total", endpoint="count_tokens", status="200")

    before = counted()
    n = claude.messages.count_tokens(model="tiny", messages=HI).input_tokens

    def line() -> str | None:
        log = (Path(srv.root) / "serve.log").read_text()
        return next((ln for ln in log.splitlines() if "endpoint=count_tokens status=200" in ln), None)

    got = wait_for(line, what="the count_tokens log line")
    assert "cortex.request" in got and "dialect=anthropic" in got and "model=tiny" in got
    assert f"prompt_tokens={n}" in got
    wait_for(lambda: counted() == before + 1, what="the count_tokens request counted")
    r = _post(srv, COUNT, {"model": "made-up", "messages": HI})
    assert r.status_code == 404
    wait_for(
        lambda: (
            value(scrape(srv.metrics_url), "cortex_requests_total", endpoint="count_tokens", model="", status="404")
            == 1
        ),
        what="an unknown model's count, with no model label",
    )

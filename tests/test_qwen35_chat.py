"""The Qwen3.5 chat format: its template, its reasoning, and its XML-parameter tool calls.

Qwen3.5 thinks unless asked not to: its generation prompt opens ``<think>\\n`` (or writes an empty
think block when ``enable_thinking`` is false), lists the tools as JSON in the system turn, and asks
for calls written as XML parameters, ``<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n
</parameter>\\n</function>\\n</tool_call>``. A value is text; the tool's schema says what it stands
for. tests/templates/qwen3_5.jinja writes that format; the vocabulary is the real one
(tests/qwen_tok.py). End to end, a tiny random Qwen3.5 is served with both and driven through the
official SDKs: what it writes means nothing, but its forced calls are well formed by construction.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import anthropic
import numpy as np
import openai
import pytest

from cortex.chat import prompt as chat_prompt
from cortex.chat.output import OutputParser, Reasoning, Text, ToolCall
from cortex.chat.schema import typed_value
from cortex.chat.template import ChatTemplate
from cortex.chat.tokenizer import from_hf_dir, token_bytes
from cortex.engine.constraint import Grammars, Rules
from tests.checkpoints import QWEN3_5_VOCAB, make_qwen3_5_chat_checkpoint
from tests.conftest import Server, tiny_models_toml
from tests.qwen_tok import built

TEMPLATE = (Path(__file__).parent / "templates" / "qwen3_5.jinja").read_text()
WEATHER = {
    "name": "get_weather",
    "description": "Current weather",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "metric": {"type": "boolean"},
            "at": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}}},
        },
        "required": ["city"],
    },
}
# what a random model can finish: every value is bounded by its schema
ALARM = {
    "name": "set_alarm",
    "description": "Set an alarm",
    "parameters": {
        "type": "object",
        "properties": {
            "hour": {"type": "integer", "minimum": 0, "maximum": 23},
            "loud": {"type": "boolean"},
            "label": {"type": "string", "enum": ["wake up", "nap"]},
            "days": {"type": "array", "items": {"enum": ["mon", "tue"]}, "minItems": 1, "maxItems": 2},
        },
        "required": ["hour", "loud", "label", "days"],
    },
}


@pytest.fixture(scope="module")
def template():
    return ChatTemplate(TEMPLATE, None, "<|im_end|>")


@pytest.fixture(scope="module")
def tokenizer():
    return from_hf_dir(built("qwen3_5").parent)


def _render(template, messages, tools=None, thinking=None, **kwargs) -> str:
    return chat_prompt.render(template, messages, tools, thinking, kwargs or None)


USER = [{"role": "user", "content": "Weather in Paris?"}]


# -- the template -------------------------------------------------------------------------------------


def test_thinking_is_on_unless_switched_off(template):
    on = _render(template, USER)
    assert on == "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert chat_prompt.opens_in_reasoning(on)
    for off in (_render(template, USER, thinking=False), _render(template, USER, enable_thinking=False)):
        assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert not chat_prompt.opens_in_reasoning(off)


def test_tools_are_listed_in_the_system_turn_with_the_xml_call_format(template):
    text = _render(template, [{"role": "system", "content": "Be brief."}, *USER], [WEATHER])
    system = text[: text.index("<|im_end|>")]
    assert system.startswith("<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n")
    assert json.dumps({"type": "function", "function": WEATHER}, ensure_ascii=False) in system
    assert "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n" in system
    assert system.endswith("</IMPORTANT>\n\nBe brief.")
    assert template.knows_tools and template.call_format == "xml"
    assert ChatTemplate(Path(__file__).parent.joinpath("templates", "think.jinja").read_text()).call_format == "json"


def test_calls_results_and_reasoning_over_several_turns(template):
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {}}}
    call["function"]["arguments"] = {"city": "Paris\nFrance", "days": 2, "at": {"lat": 48.9, "lon": 2.35}}
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "A greeting."},
        *USER,
        {"role": "assistant", "content": "Let me look.", "reasoning_content": "I need the tool.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "22 C"},
    ]
    text = _render(template, messages, [WEATHER])
    turns = text[text.index("<|im_start|>user") :]
    assert turns == (
        "<|im_start|>user\nHi<|im_end|>\n"
        # reasoning before the last question is dropped; within its tool loop it is kept
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nI need the tool.\n</think>\n\nLet me look.\n\n"
        "<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\nParis\nFrance\n</parameter>\n"
        "<parameter=days>\n2\n</parameter>\n"
        '<parameter=at>\n{"lat": 48.9, "lon": 2.35}\n</parameter>\n'
        "</function>\n</tool_call><|im_end|>\n"
        # parallel results share one user turn
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n22 C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )


def test_the_prompt_writes_each_tag_as_its_one_token(template, tokenizer):
    text = _render(template, [*USER, {"role": "tool", "tool_call_id": "c", "content": "x"}], [WEATHER])
    ids = tokenizer.encode(text)
    for tag in ("<|im_start|>", "<|im_end|>", "<tool_response>", "</tool_response>", "<think>"):
        assert tokenizer.tokenizer.token_to_id(tag) in ids
    assert tokenizer.tokenizer.decode(ids, skip_special_tokens=False) == text


# -- reading the output -------------------------------------------------------------------------------


def _merged(parts: list) -> list:
    """Parts with neighbouring text (or reasoning) joined: how they split is the stream's business."""
    out: list = []
    for p in parts:
        if out and type(p) in (Text, Reasoning) and type(out[-1]) is type(p):
            out[-1] = type(p)(out[-1].text + p.text)
        else:
            out.append(p)
    return out


def _parse(chunks: list[str], reasoning: bool = False, tools=(WEATHER,)) -> list:
    parser = OutputParser(reasoning=reasoning, tools=list(tools))
    parts = [p for c in chunks for p in parser.feed(c)]
    return _merged(parts + parser.finish())


def _every_split(text: str, reasoning: bool = False, tools=(WEATHER,)) -> list:
    """The parts of ``text``, the same whether it arrives whole, in two pieces split anywhere, or
    one character at a time."""
    whole = _parse([text], reasoning, tools)
    for at in range(len(text) + 1):
        assert _parse([text[:at], text[at:]], reasoning, tools) == whole, at
    assert _parse(list(text), reasoning, tools) == whole
    return whole


XML_CALL = (
    "<tool_call>\n<function=get_weather>\n"
    "<parameter=city>\n New York \n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n"
    "<parameter=metric>\nfalse\n</parameter>\n"
    '<parameter=at>\n{"lat": 40.7, "lon": -74}\n</parameter>\n'
    "<parameter=note>\n42\n</parameter>\n"
    "</function>\n</tool_call>"
)
KNOWN_CALL = XML_CALL.replace("<parameter=note>\n42\n</parameter>\n", "")  # only the tool's parameters
XML_ARGS = {"city": " New York ", "days": 3, "metric": False, "at": {"lat": 40.7, "lon": -74}, "note": "42"}


def test_an_xml_call_in_pieces_is_one_call_with_typed_arguments():
    assert _every_split(XML_CALL) == [ToolCall(0, "get_weather", XML_ARGS)]


def test_output_that_starts_inside_reasoning_then_answers_and_calls():
    text = "The user wants weather.\n</think>\n\nChecking.\n\n" + XML_CALL
    assert _every_split(text, reasoning=True) == [
        Reasoning("The user wants weather.\n"),
        Text("Checking."),
        ToolCall(0, "get_weather", XML_ARGS),
    ]


def test_parallel_xml_calls_and_an_argumentless_one():
    second = "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>"
    bare = "<tool_call>\n<function=ping>\n</function>\n</tool_call>"
    assert _every_split(f"{XML_CALL}\n{second}\n{bare}") == [
        ToolCall(0, "get_weather", XML_ARGS),
        ToolCall(1, "get_weather", {"city": "Rome"}),
        ToolCall(2, "ping", {}),
    ]


def test_a_multiline_string_value_is_kept_verbatim():
    code = "def f(x):\n    return x < 2 and '</param'\n\n"
    text = f"<tool_call>\n<function=get_weather>\n<parameter=city>\n{code}\n</parameter>\n</function>\n</tool_call>"
    assert _every_split(text) == [ToolCall(0, "get_weather", {"city": code})]


def test_the_json_call_form_still_works():
    text = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
    assert _every_split(text) == [Text("Sure."), ToolCall(0, "get_weather", {"city": "Paris", "days": 2})]


def test_a_malformed_xml_call_is_text():
    text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>"
    assert _every_split(text) == [Text(text)]


@pytest.mark.parametrize(
    ("schema", "text", "value"),
    [
        ({"type": "integer"}, "-12", -12),
        ({"type": "integer"}, "3.0", 3),
        ({"type": "integer"}, "three", "three"),
        ({"type": "number"}, "2.5e3", 2500.0),
        ({"type": "number"}, "7", 7),
        ({"type": "boolean"}, "true", True),
        ({"type": "boolean"}, "yes", "yes"),
        ({"type": "null"}, "null", None),
        ({"type": ["string", "null"]}, "null", None),
        ({"type": ["integer", "null"]}, "5", 5),
        ({"type": "object"}, '{"a": [1, "x"]}', {"a": [1, "x"]}),
        ({"type": "object"}, "[1]", "[1]"),
        ({"type": "array"}, '[1, "x"]', [1, "x"]),
        ({"type": "string"}, "true", "true"),
        ({"type": "string"}, '{"a": 1}', '{"a": 1}'),
        ({"enum": [1, 2]}, "2", 2),
        ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, "false", False),
        ({}, "17", "17"),
        (None, "17", "17"),
    ],
)
def test_a_value_is_read_as_its_schema_types_it(schema, text, value):
    got = typed_value(text, schema)
    assert got == value and type(got) is type(value)


# -- forcing a call: the grammar ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def grammars(tokenizer):
    eos = [tokenizer.tokenizer.token_to_id("<|im_end|>")]
    return Grammars(tokenizer.tokenizer, QWEN3_5_VOCAB, eos, call_format="xml")


def _allowed(mask: bytes | None) -> np.ndarray:
    """The token ids a mask allows (None: any)."""
    if mask is None:
        return np.arange(QWEN3_5_VOCAB)
    return np.flatnonzero(np.unpackbits(np.frombuffer(mask, dtype=np.uint8), bitorder="little"))


def _sample(grammars, tokenizer, rules: Rules, seed: int) -> tuple[str, list[int]]:
    """What a model that picks any token the grammar allows, at random, writes until it may end:
    its text and its tokens."""
    constraint = grammars.constraint(rules)
    eos, rng, ids = tokenizer.tokenizer.token_to_id("<|im_end|>"), random.Random(seed), []
    for _ in range(400):
        allowed = _allowed(constraint.mask())
        if list(allowed) == [eos]:
            return tokenizer.tokenizer.decode(ids, skip_special_tokens=True), ids
        token = int(rng.choice([t for t in allowed if t != eos]))
        ids.append(token)
        constraint.advance(token, token_bytes(tokenizer.tokenizer, token))
    raise AssertionError(f"no end after 400 tokens: {tokenizer.tokenizer.decode(ids)!r}")


@pytest.mark.parametrize("seed", range(4))
def test_a_forced_call_is_the_xml_form_with_every_required_parameter(grammars, tokenizer, seed):
    rules = Rules(tools=[ALARM], tool_mode="required", parallel=False)
    text, ids = _sample(grammars, tokenizer, rules, seed)
    tags = [tokenizer.tokenizer.token_to_id(t) for t in ("<tool_call>", "</tool_call>")]
    assert [ids[0], ids[-1]] == tags  # the tags are the vocabulary's own tokens, as the model writes them
    assert text.startswith("<tool_call>\n<function=set_alarm>\n<parameter=hour>\n") and text.endswith(
        "</function>\n</tool_call>"
    )
    [call] = _parse([text], tools=[ALARM])
    args = call.arguments
    assert call.name == "set_alarm" and list(args) == ["hour", "loud", "label", "days"]
    assert type(args["hour"]) is int and 0 <= args["hour"] <= 23 and type(args["loud"]) is bool
    assert args["label"] in ("wake up", "nap") and set(args["days"]) <= {"mon", "tue"}


def _accepts(grammars, tokenizer, rules: Rules, text: str) -> bool:
    constraint = grammars.constraint(rules)
    for token in tokenizer.encode(text):
        if token not in _allowed(constraint.mask()):
            return False
        constraint.advance(token, token_bytes(tokenizer.tokenizer, token))
    return True


def test_the_forced_grammar_takes_free_text_strings_and_optional_parameters(grammars, tokenizer):
    rules = Rules(tools=[WEATHER], tool_mode="required", parallel=True)
    one = "<tool_call>\n<function=get_weather>\n<parameter=city>\nx < y </par\n</parameter>\n</function>\n</tool_call>"
    assert _accepts(grammars, tokenizer, rules, one)
    assert _accepts(grammars, tokenizer, rules, KNOWN_CALL)
    assert _accepts(grammars, tokenizer, rules, f"{one}\n{one}")
    # the structure is exact: no unknown parameter, no missing required one, no JSON body
    assert not _accepts(grammars, tokenizer, rules, XML_CALL)
    assert not _accepts(grammars, tokenizer, rules, "<tool_call>\n<function=get_weather>\n</function>")
    assert not _accepts(grammars, tokenizer, rules, '<tool_call>\n{"name": "get_weather"')
    # values of other types are JSON of their schemas: days is an integer
    assert not _accepts(
        grammars, tokenizer, rules, KNOWN_CALL.replace("<parameter=days>\n3\n", "<parameter=days>\nthree\n")
    )


def test_parameters_whose_schemas_are_refs_into_the_tools_defs(grammars, tokenizer):
    """Pydantic keeps a tool's parts in $defs; a recursive schema refers to its own root."""
    place = {
        "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
        "type": "object",
        "properties": {"at": {"$ref": "#/$defs/Point"}, "near": {"$ref": "#"}, "name": {"type": "string"}},
        "required": ["at"],
    }
    tool = {"name": "goto", "parameters": place}
    rules = Rules(tools=[tool], tool_mode="required", parallel=False)
    text = (
        '<tool_call>\n<function=goto>\n<parameter=at>\n{"x": 1}\n</parameter>\n'
        '<parameter=near>\n{"at": {"x": 2}, "name": "b"}\n</parameter>\n</function>\n</tool_call>'
    )
    assert _accepts(grammars, tokenizer, rules, text)
    assert not _accepts(grammars, tokenizer, rules, text.replace('{"x": 1}', '{"y": 1}'))
    assert _parse([text], tools=[tool]) == [
        ToolCall(0, "goto", {"at": {"x": 1}, "near": {"at": {"x": 2}, "name": "b"}})
    ]


def test_auto_calls_are_free_until_the_model_opens_one(grammars, tokenizer):
    rules = Rules(tools=[WEATHER], tool_mode="auto")
    assert _accepts(grammars, tokenizer, rules, f"Let me check.\n\n{KNOWN_CALL}\nAnd more text.\n\n{KNOWN_CALL}")
    assert not _accepts(grammars, tokenizer, rules, "Let me check.\n\n<tool_call>\n<function=get_time>")


# -- served end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = make_qwen3_5_chat_checkpoint(tmp_path_factory.mktemp("tiny-qwen3_5-chat"), built("qwen3_5"), TEMPLATE)
    extra = '[engine]\nmax_seqs = 2\nkv_cache_mb = 8\nkv_cache_dtype = "float32"\nstep_target_ms = 0\n'
    srv = Server(tmp_path_factory.mktemp("qwen35-srv"), tiny_models_toml(model, "max_context = 2048", "qwen35"), extra)
    try:
        srv.wait_healthy(timeout=240)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=300)


ASK = [{"role": "user", "content": "Wake me at seven on Monday, loudly."}]
OPENAI_ALARM = [{"type": "function", "function": ALARM}]
ANTHROPIC_ALARM = [{"name": ALARM["name"], "description": ALARM["description"], "input_schema": ALARM["parameters"]}]
SAMPLED = {"temperature": 1.0, "seed": 7}


def _typed_alarm(args: dict) -> None:
    assert list(args) == ["hour", "loud", "label", "days"]
    assert type(args["hour"]) is int and type(args["loud"]) is bool and args["label"] in ("wake up", "nap")
    assert isinstance(args["days"], list) and set(args["days"]) <= {"mon", "tue"}


def _forced_openai_call(oai, **kwargs):
    return oai.chat.completions.create(
        model="qwen35",
        messages=ASK,
        tools=OPENAI_ALARM,
        tool_choice={"type": "function", "function": {"name": "set_alarm"}},
        parallel_tool_calls=False,
        max_tokens=120,
        **SAMPLED,
        **kwargs,
    )


def test_openai_forced_call_comes_back_parsed_and_typed(oai):
    choice = _forced_openai_call(oai).choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.function.name == "set_alarm"
    _typed_alarm(json.loads(call.function.arguments))


def test_a_forced_call_is_written_in_the_models_xml_form(oai):
    """The grammar of a model whose template asks for XML calls is the XML form (the leader builds
    the model's Grammars with its template's call_format)."""
    choice = _forced_openai_call(oai, logprobs=True).choices[0]
    written = "".join(t.token for t in choice.logprobs.content)
    assert written.startswith("<tool_call>\n<function=set_alarm>\n<parameter=hour>\n")
    assert written.endswith("</parameter>\n</function>\n</tool_call>")


def test_openai_forced_call_streamed_is_the_same_call(oai):
    kwargs = dict(model="qwen35", messages=ASK, tools=OPENAI_ALARM, tool_choice="required", max_tokens=120)
    whole = oai.chat.completions.create(parallel_tool_calls=False, **kwargs, **SAMPLED)
    stream = oai.chat.completions.create(parallel_tool_calls=False, stream=True, **kwargs, **SAMPLED)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    args = "".join(tc.function.arguments or "" for d in deltas for tc in d.tool_calls or ())
    names = [tc.function.name for d in deltas for tc in d.tool_calls or () if tc.function.name]
    assert names == ["set_alarm"] and json.loads(args) == json.loads(
        whole.choices[0].message.tool_calls[0].function.arguments
    )
    _typed_alarm(json.loads(args))


def test_anthropic_forced_call_comes_back_as_typed_tool_use(claude):
    kwargs = dict(
        model="qwen35",
        max_tokens=120,
        messages=ASK,
        tools=ANTHROPIC_ALARM,
        tool_choice={"type": "tool", "name": "set_alarm", "disable_parallel_tool_use": True},
        extra_body=SAMPLED,
    )
    r = claude.messages.create(**kwargs)
    assert r.stop_reason == "tool_use" and [b.type for b in r.content] == ["tool_use"]
    assert r.content[0].name == "set_alarm"
    _typed_alarm(r.content[0].input)
    with claude.messages.stream(**kwargs) as s:
        partial = "".join(ev.delta.partial_json for ev in s if ev.type == "content_block_delta")
        final = s.get_final_message()
    assert json.loads(partial) == final.content[0].input == r.content[0].input


def test_openai_thinking_on_by_default_and_off_per_request(oai):
    kwargs = dict(model="qwen35", messages=ASK, max_tokens=8, extra_body={"ignore_eos": True}, **SAMPLED)
    on = oai.chat.completions.create(**kwargs)
    assert on.choices[0].message.reasoning_content and not on.choices[0].message.content
    stream = oai.chat.completions.create(stream=True, **kwargs)
    streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in stream if c.choices)
    assert streamed == on.choices[0].message.reasoning_content
    kwargs["extra_body"] = {"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}}
    off = oai.chat.completions.create(**kwargs)
    assert off.choices[0].message.content and getattr(off.choices[0].message, "reasoning_content", None) is None


def test_anthropic_thinking_blocks_when_enabled_and_none_when_disabled(claude):
    kwargs = dict(model="qwen35", max_tokens=8, messages=ASK, extra_body=SAMPLED)
    on = claude.messages.create(thinking={"type": "enabled", "budget_tokens": 1024}, **kwargs)
    assert [b.type for b in on.content] == ["thinking"] and on.content[0].thinking
    for off in (claude.messages.create(thinking={"type": "disabled"}, **kwargs), claude.messages.create(**kwargs)):
        assert [b.type for b in off.content] == ["text"] and off.content[0].text

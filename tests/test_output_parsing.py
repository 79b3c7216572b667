"""The one output parser both dialects render from, the grammar constraint, and the worker's mask."""

from __future__ import annotations

import json

import pytest
import torch

from cortex.chat.output import OutputParser, Reasoning, Text, ToolCall
from cortex.chat.prompt import opens_in_reasoning, render
from cortex.chat.template import CHATML, ChatTemplate
from rpc.messages import SamplingParams
from workers.sampling import allowed_mask, sample

OUTPUT = (
    "<think>\nThe user wants weather.\n</think>\n\nLet me check.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"city": "Rome"}}\n</tool_call>'
)


def _merged(parts: list) -> list:
    out = []
    for p in parts:
        if out and type(p) is type(out[-1]) and not isinstance(p, ToolCall):
            out[-1] = type(p)(out[-1].text + p.text)
        else:
            out.append(p)
    return out


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 11, len(OUTPUT)])
def test_tags_split_anywhere_across_deltas_parse_the_same(size):
    parser = OutputParser(tools=True)
    parts = []
    for i in range(0, len(OUTPUT), size):
        parts += parser.feed(OUTPUT[i : i + size])
    parts += parser.finish()
    assert _merged(parts) == [
        Reasoning("\nThe user wants weather.\n"),
        Text("Let me check."),
        ToolCall(0, "get_weather", {"city": "Paris"}),
        ToolCall(1, "get_time", {"city": "Rome"}),
    ]


def test_a_prompt_that_opens_a_think_span_starts_in_reasoning():
    parser = OutputParser(reasoning=True)
    parts = parser.feed("pondering</think>Answer") + parser.finish()
    assert parts == [Reasoning("pondering"), Text("Answer")]


def test_without_tools_a_tool_tag_is_just_text_and_a_broken_call_is_kept_as_text():
    assert _merged(OutputParser().feed("a <tool_call>x</tool_call>")) == [Text("a <tool_call>x</tool_call>")]
    parser = OutputParser(tools=True)
    parts = parser.feed("<tool_call>not json</tool_call>") + parser.feed("<tool_call>{") + parser.finish()
    assert _merged(parts) == [Text("<tool_call>not json</tool_call><tool_call>{")]
    assert parser.calls == 0


def test_templates_without_tools_get_them_in_the_system_prompt_and_hermes_calls():
    tools = [{"name": "get_weather", "description": "weather", "parameters": {"type": "object"}}]
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    text = render(ChatTemplate(CHATML), messages, tools, None)
    assert text.startswith("<|im_start|>system\nYou may call") and '"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>" in text
    assert opens_in_reasoning("<|im_start|>assistant\n<think>\n") and not opens_in_reasoning(text)


def test_the_worker_never_samples_outside_the_grammar_mask():
    logits = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0])
    mask = bytes([0b0100_0000, 0b10])  # tokens 6 and 9
    assert allowed_mask(mask, 10, torch.device("cpu")).nonzero().flatten().tolist() == [6, 9]
    assert sample(logits, SamplingParams(temperature=0), None, 10, allowed=mask) == 6
    gen = torch.Generator().manual_seed(0)
    drawn = {sample(logits, SamplingParams(temperature=2.0), gen, 10, allowed=mask) for _ in range(50)}
    assert drawn == {6, 9}


def test_top_p_zero_means_the_most_likely_token():
    logits = torch.tensor([1.0, 3.0, 2.0])
    gen = torch.Generator().manual_seed(0)
    assert {sample(logits, SamplingParams(temperature=1.0, top_p=0.0), gen, 3) for _ in range(20)} == {1}


def test_a_forced_call_is_valid_json_for_any_choice_of_allowed_tokens(tmp_path):
    """Walk the grammar with adversarial choices (always the last allowed token): still a valid call."""
    from cortex.chat.tokenizer import token_bytes
    from cortex.engine.constraint import Grammars, Rules
    from tests.conftest import train_tiny_tokenizer

    train_tiny_tokenizer(tmp_path)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")
    schema = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "n": {"type": "integer"}}}
    rules = Rules(tools=[{"name": "f", "parameters": schema}], tool_mode="required", parallel=False)
    c = Grammars(tok, tok.get_vocab_size(), [eos]).constraint(rules)
    out = []
    for _ in range(200):
        allowed = allowed_mask(c.mask(), tok.get_vocab_size(), torch.device("cpu")).nonzero().flatten().tolist()
        pick = allowed[-1] if len(out) < 40 or eos not in allowed else eos  # wander, then end when allowed
        if pick == eos:
            break
        c.advance(pick, token_bytes(tok, pick))
        out.append(pick)
    text = tok.decode(out, skip_special_tokens=False)
    assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>")
    call = json.loads(text.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))
    assert call["name"] == "f" and set(call["arguments"]) <= {"unit", "n"}


def test_a_grammar_is_compiled_once_and_each_sequence_gets_its_own_state(tmp_path):
    from cortex.engine.constraint import Grammars, Rules
    from tests.conftest import train_tiny_tokenizer

    train_tiny_tokenizer(tmp_path)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    grammars = Grammars(tok, tok.get_vocab_size(), [tok.token_to_id("<|im_end|>")])
    rules = Rules(json_schema={"type": "object", "properties": {"a": {"type": "integer"}}})
    first, second = grammars.constraint(rules), grammars.constraint(rules)
    assert grammars.compiles == 1
    before = second.mask()
    allowed = allowed_mask(first.mask(), tok.get_vocab_size(), torch.device("cpu")).nonzero().flatten().tolist()
    first.advance(allowed[0], b"")  # one sequence moves on; the other's state does not
    assert second.mask() == before and first.mask() != before
    grammars.constraint(Rules(json_schema={"type": "object"}))
    assert grammars.compiles == 2  # another schema is another grammar


def test_the_preparer_wakes_the_loop_when_a_request_is_ready_and_forgets_cancelled_ones():
    import select
    import threading

    from cortex.engine.prepare import Preparer, Refused

    preparer = Preparer(threads=2)
    gate = threading.Event()
    preparer.submit("slow", "ctx-slow", lambda: gate.wait(60) and Refused("invalid_request", "late"))
    preparer.submit("gone", "ctx-gone", lambda: gate.wait(60) and Refused("invalid_request", "never read"))
    assert "slow" in preparer and len(preparer) == 2
    assert select.select([preparer.wake_fd], [], [], 0)[0] == []  # nothing ready: the loop sleeps
    assert preparer.finished() == []
    assert preparer.discard("gone") == "ctx-gone"  # its client left
    gate.set()
    assert select.select([preparer.wake_fd], [], [], 60)[0] == [preparer.wake_fd]
    done = []
    while not done:
        done = preparer.finished()
    assert [(rid, ctx, r.message) for rid, ctx, r in done] == [("slow", "ctx-slow", "late")]
    assert len(preparer) == 0 and preparer.abandon() == []

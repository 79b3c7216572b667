"""A choice's generated text, split into what it is: answer text, reasoning, tool calls.

Both dialects render the same parts (OpenAI ``content`` / ``reasoning_content`` / ``tool_calls``;
Anthropic ``text`` / ``thinking`` / ``tool_use`` blocks), so this is the one place that reads
``<think>`` spans and ``<tool_call>`` blocks out of a stream. A tag can arrive split over
several deltas: text that might be the start of a tag is held back until it is known not to be.

A call's body is JSON (Hermes, Qwen3) or XML parameters (Qwen3.5, Qwen3-Coder), told apart by how it
starts. XML parameter values are text: each is read as the JSON type its tool's schema gives it
(integer, number, boolean, null, object, array); strings, and parameters the schema does not
describe, are kept as written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cortex.chat.schema import parameter_schema, typed_value
from cortex.chat.tags import (
    FUNCTION_CLOSE,
    FUNCTION_OPEN,
    PARAMETER_CLOSE,
    PARAMETER_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CLOSE,
    TOOL_OPEN,
)


@dataclass
class Text:
    text: str


@dataclass
class Reasoning:
    text: str


@dataclass
class ToolCall:
    index: int  # 0, 1, ... within the choice
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


Part = Text | Reasoning | ToolCall


def _held(buf: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of one of ``tags``."""
    for n in range(min(len(buf), max(len(t) for t in tags) - 1), 0, -1):
        if any(t.startswith(buf[-n:]) for t in tags):
            return n
    return 0


class OutputParser:
    """``reasoning``: the output starts inside a reasoning span (the prompt opened it); ``tools``:
    whether to read tool calls, or the tools themselves ([{"name", "parameters"}]), whose schemas
    type the values of XML parameters."""

    def __init__(self, reasoning: bool = False, tools: bool | Sequence[dict[str, Any]] | None = False):
        self.mode = "reasoning" if reasoning else "text"
        self.tools = bool(tools)
        self.schemas = {t["name"]: t.get("parameters") for t in tools} if tools and tools is not True else {}
        self.calls = 0
        self._buf = ""
        self._strip = False  # drop whitespace at the start of the next text (after </think>)

    def feed(self, text: str) -> list[Part]:
        self._buf += text
        out: list[Part] = []
        while True:
            before = (self.mode, len(self._buf))
            out += self._advance()
            if (self.mode, len(self._buf)) == before:
                return [p for p in out if not isinstance(p, (Text, Reasoning)) or p.text]

    def finish(self) -> list[Part]:
        """The end of the output: whatever is held back is what it is (an unclosed call is text),
        except an unclosed call after whole ones: one more call cut off by the token limit (a
        forced call's grammar allows more), which is no answer text."""
        rest, self._buf = self._buf, ""
        if self.mode == "reasoning":
            return [Reasoning(rest)] if rest else []
        if self.mode == "tool":
            if self.calls:
                return []
            rest = TOOL_OPEN + rest
        rest = rest.lstrip() if self._strip else rest
        return [Text(rest)] if rest else []

    def _advance(self) -> list[Part]:
        if self.mode == "reasoning":
            at = self._buf.find(THINK_CLOSE)
            if at < 0:
                keep = _held(self._buf, (THINK_CLOSE,))
                out, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
                return [Reasoning(out)]
            out, self._buf = self._buf[:at], self._buf[at + len(THINK_CLOSE) :]
            self.mode, self._strip = "text", True
            return [Reasoning(out)]
        if self.mode == "tool":
            at = self._buf.find(TOOL_CLOSE)
            if at < 0:
                return []
            body, self._buf = self._buf[:at], self._buf[at + len(TOOL_CLOSE) :]
            self.mode, self._strip = "text", True
            call = self._parse_call(body)
            return [call] if call else [Text(f"{TOOL_OPEN}{body}{TOOL_CLOSE}")]
        return self._advance_text()

    def _advance_text(self) -> list[Part]:
        if self._strip:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return []
            self._strip = False
        tags = (THINK_OPEN, TOOL_OPEN) if self.tools else (THINK_OPEN,)
        hits = [(self._buf.find(t), t) for t in tags if t in self._buf]
        if not hits:
            cut = len(self._buf) - _held(self._buf, tags)
            if self.tools:  # whitespace before a call is dropped, so it waits to see what follows
                cut = len(self._buf[:cut].rstrip())
            out, self._buf = self._buf[:cut], self._buf[cut:]
            return [Text(out)]
        at, tag = min(hits)
        out, self._buf = self._buf[:at], self._buf[at + len(tag) :]
        if tag == TOOL_OPEN:
            self.mode = "tool"
            out = out.rstrip()  # the newline a model writes before a call is not part of the answer
        else:
            self.mode = "reasoning"
        return [Text(out)]

    def _parse_call(self, body: str) -> ToolCall | None:
        parsed = _xml_call(body, self.schemas) if body.lstrip().startswith(FUNCTION_OPEN) else _json_call(body)
        if parsed is None:
            return None
        self.calls += 1
        return ToolCall(self.calls - 1, *parsed)


def _json_call(body: str) -> tuple[str, dict[str, Any]] | None:
    """``{"name": ..., "arguments": {...}}`` (the arguments may be a JSON string, or ``parameters``)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    args = data.get("arguments", data.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return data["name"], args


_FUNCTION = re.compile(rf"\s*{FUNCTION_OPEN}([^>\n]+)>\n?(.*){FUNCTION_CLOSE}\s*", re.S)
# a value is the text between the lines of its tags: one newline after the opening tag and one
# before the closing tag belong to the format, not to the value
_PARAMETER = re.compile(rf"\s*{PARAMETER_OPEN}([^>\n]+)>\n?(.*?)\n?{PARAMETER_CLOSE}", re.S)


def _xml_call(body: str, schemas: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """``<function=NAME>`` and its ``<parameter=KEY>`` blocks; None unless the whole body is that."""
    fn = _FUNCTION.fullmatch(body)
    if fn is None:
        return None
    name, inner = fn[1].strip(), fn[2]
    schema = schemas.get(name)
    args: dict[str, Any] = {}
    at = 0
    while (param := _PARAMETER.match(inner, at)) is not None:
        key = param[1].strip()
        args[key] = typed_value(param[2], parameter_schema(schema, key))
        at = param.end()
    if inner[at:].strip():
        return None
    return name, args

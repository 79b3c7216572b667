"""Constrained decoding: the tokens a sequence may sample next, from a grammar.

``response_format`` (JSON object or JSON schema) and forced tool calls are grammars compiled by
llguidance (a Rust library: computing a mask over a 150k-token vocabulary takes well under a
millisecond, which Python could not do per step). The leader keeps one matcher per constrained
sequence, sends its bitmask with each step (``SeqInput.allowed``) and advances it with the token
the worker sampled, so the output always parses and validates, even on a small model.

Tool calls use the Hermes format that Qwen and most open templates use:
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``. With ``tool_choice`` auto the
model writes freely until it opens a ``<tool_call>``; from there its call is constrained too.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import llguidance as llg
from tokenizers import Tokenizer

from cortex.chat.tags import TOOL_CLOSE, TOOL_OPEN

# compact JSON as json.dumps writes it, no free whitespace for a small model to wander into
_JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", ", "lenient": True}


class GrammarError(ValueError):
    """A schema or tool definition the grammar compiler refuses (the request's fault)."""


@dataclass
class Rules:
    """What a request constrains; built by the leader from the dialect-neutral Submit."""

    json_schema: dict[str, Any] | None = None  # {} means any JSON object (json_object mode)
    tools: list[dict[str, Any]] | None = None  # [{"name", "description", "parameters"}]
    tool_mode: str = "none"  # none | auto | required (a call is forced) ; a forced name narrows tools
    parallel: bool = True  # more than one call allowed

    @property
    def active(self) -> bool:
        return self.json_schema is not None or (bool(self.tools) and self.tool_mode in ("auto", "required"))


def closed(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` wherever it is left open. Output that fits
    it still validates against the original; a small model is not free to invent keys (OpenAI's
    strict mode requires the same)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    variants = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["name"]},
                "arguments": closed(t.get("parameters") or {"type": "object"}),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return {**schema, "x-guidance": _JSON_STYLE}


def _lark_string(s: str) -> str:
    return json.dumps(s)


class Grammars:
    """Compiles grammars against one model's vocabulary, and keeps the last ``CACHED`` compiled ones
    by their text: a new sequence with a known grammar gets a copy of a fresh matcher, not a
    compile. Building the llguidance tokenizer reads the whole vocabulary (about a second for
    Qwen's 151k tokens), so it happens once, on first use. Thread-safe: requests are prepared on
    threads (cortex/engine/prepare.py)."""

    CACHED = 64

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: list[int]):
        self._source = (tokenizer, vocab_size, sorted(eos_ids))
        self._tok: llg.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llg.LLMatcher] = OrderedDict()  # grammar text -> unused matcher
        self._lock = threading.Lock()
        self.compiles = 0  # how many grammars were compiled (the rest came from the cache)

    @property
    def tokenizer(self) -> llg.LLTokenizer:
        with self._lock:
            if self._tok is None:
                tok, vocab, eos = self._source
                self._tok = llg.LLTokenizer(tok.to_str(), n_vocab=vocab, eos_token=eos or None)
            return self._tok

    def _matcher(self, grammar: str) -> llg.LLMatcher:
        with self._lock:
            fresh = self._compiled.get(grammar)
            if fresh is not None:
                self._compiled.move_to_end(grammar)
                return fresh.deep_copy()
        m = llg.LLMatcher(self.tokenizer, grammar, log_level=0)  # outside the lock: compiles run side by side
        if m.is_error():
            raise GrammarError(m.get_error())
        with self._lock:
            self.compiles += 1
            self._compiled[grammar] = m.deep_copy()
            while len(self._compiled) > self.CACHED:
                self._compiled.popitem(last=False)
        return m

    def constraint(self, rules: Rules) -> Constraint | None:
        """The constraint a new sequence starts with (None when it is unconstrained)."""
        if not rules.active:
            return None
        if rules.json_schema is not None:
            schema = {**closed(rules.json_schema or {"type": "object"}), "x-guidance": _JSON_STYLE}
            return Constraint(self._matcher(llg.LLMatcher.grammar_from_json_schema(schema)), None)
        body = self._call_body(rules.tools)
        if rules.tool_mode == "required":
            repeat = f'("\\n" {_lark_string(TOOL_OPEN)} body)*' if rules.parallel else ""
            lark = f"start: {_lark_string(TOOL_OPEN)} body {repeat}\n{body}"
            return Constraint(self._matcher(llg.LLMatcher.grammar_from_lark(lark)), None)
        # auto: free text until the model opens a call; each call's body is then constrained
        grammar = llg.LLMatcher.grammar_from_lark(f"start: body\n{body}")
        self._matcher(grammar)  # compile once now, so a bad schema is a 400 before generation
        return Constraint(None, lambda: self._matcher(grammar), rules.parallel)

    @staticmethod
    def _call_body(tools: list[dict[str, Any]]) -> str:
        return f'body: "\\n" call "\\n" {_lark_string(TOOL_CLOSE)}\ncall: %json {json.dumps(_call_schema(tools))}'


class Constraint:
    """One sequence's grammar state: ``mask()`` before a step, ``advance()`` with what it sampled."""

    def __init__(self, matcher: llg.LLMatcher | None, on_trigger: Any = None, parallel: bool = True):
        self.matcher = matcher
        self._on_trigger = on_trigger  # auto tool calls: builds the call-body matcher
        self._parallel = parallel
        self._tail = b""  # the last bytes written, to spot the opening tag
        self.calls = 0

    def mask(self) -> bytes | None:
        if self.matcher is None:
            return None
        return self.matcher.compute_bitmask()

    def advance(self, token: int, token_bytes: bytes) -> None:
        if self.matcher is not None:
            self.matcher.consume_token(token)
            if self._on_trigger is not None and self.matcher.is_stopped():
                self.calls += 1
                if self._parallel:
                    self.matcher = None  # the call is closed: free text again, maybe another call
                else:
                    self._on_trigger = None  # the finished matcher now allows only the end of the turn
            return
        if self._on_trigger is None:
            return
        self._tail = (self._tail + token_bytes)[-64:]
        if self._tail.endswith(TOOL_OPEN.encode()):
            self._tail = b""
            self.matcher = self._on_trigger()

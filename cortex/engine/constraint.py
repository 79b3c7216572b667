"""Constrained decoding: the tokens a sequence may sample next, from a grammar.

``response_format`` (JSON object or JSON schema) and forced tool calls are grammars compiled by
llguidance (a Rust library: computing a mask over a 150k-token vocabulary takes well under a
millisecond, which Python could not do per step). The leader keeps one matcher per constrained
sequence, sends its bitmask with each step (``SeqInput.allowed``) and advances it with the token
the worker sampled, so the output always parses and validates, even on a small model.

Tool calls use the format of the model's chat template (``ChatTemplate.call_format``): the Hermes
JSON that Qwen3 and most open templates use, ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n
</tool_call>``, or the XML parameters of Qwen3.5 and Qwen3-Coder, ``<tool_call>\\n<function=NAME>
\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n...</function>\\n</tool_call>``. With ``tool_choice``
auto the model writes freely until it opens a ``<tool_call>``; from there its call is constrained
too. A JSON call's schema wraps each tool's: the tool's local ``$ref``s are rewritten to point into
the wrapper (``_rebased``), so tools whose schemas keep their parts in ``$defs`` (as pydantic writes
them) work. An XML call's structure is exact (the tool's name, its parameters in the schema's
order, the required ones always); a value is JSON of its schema (in place inside the tool's, its
refs rebased the same way), one of a string enum's values, or for a string any text up to the
closing tag. The tags are the vocabulary's own tokens where it keeps them as text (Qwen's
``<tool_call>``), so a constrained call is tokenized as the model would write it.

A schema no finite value satisfies (an object whose required property is another such object, and so
on without end) compiles, but a sequence constrained by it could never finish: ``finite`` spots
those before compiling, and the request is refused (a 400).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import llguidance as llg
from tokenizers import Tokenizer

from cortex.chat.schema import json_types, parameter_schema, resolve
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


# keywords whose values are JSON data, not schemas; and those whose values map names to schemas
_DATA = frozenset({"const", "enum", "default", "examples"})
_NAMED = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_TYPES = ("null", "boolean", "integer", "number", "string", "array", "object")


def _walk(schema: Any, change: Callable[[dict], dict]) -> Any:
    """``schema`` rebuilt bottom-up with ``change`` applied to each schema object in it (not to data,
    such as an enum's values, nor to the maps of names to schemas)."""
    if isinstance(schema, list):
        return [_walk(s, change) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k in _DATA:
            out[k] = v
        elif k in _NAMED and isinstance(v, dict):
            out[k] = {name: _walk(s, change) for name, s in v.items()}
        else:
            out[k] = _walk(v, change)
    return change(out)


def _close(schema: dict) -> dict:
    if "properties" in schema and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    return schema


def closed(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` wherever it is left open. Output that fits
    it still validates against the original; a small model is not free to invent keys (OpenAI's
    strict mode requires the same)."""
    return _walk(schema, _close)


def _rebased(schema: Any, base: str) -> Any:
    """``schema`` moved to ``base`` (a pointer such as ``#/properties/arguments``) inside a larger
    document: its local ``$ref``s ("#", "#/$defs/X") rewritten to point where their targets now
    are. A part with an ``$id`` is a resource of its own, its refs resolved against it: left as is."""
    if isinstance(schema, list):
        return [_rebased(s, base) for s in schema]
    if not isinstance(schema, dict) or "$id" in schema:
        return schema
    out = {}
    for k, v in schema.items():
        if k in _DATA:
            out[k] = v
        elif k == "$ref" and isinstance(v, str) and (v == "#" or v.startswith("#/")):
            out[k] = base + v[1:]
        elif k in _NAMED and isinstance(v, dict):
            out[k] = {name: _rebased(s, base) for name, s in v.items()}
        else:
            out[k] = _rebased(v, base)
    return out


def _call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    def where(i: int) -> str:  # the tool's arguments schema, in the document built here
        return "#/properties/arguments" if len(tools) == 1 else f"#/anyOf/{i}/properties/arguments"

    variants = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["name"]},
                "arguments": _rebased(closed(t.get("parameters") or {"type": "object"}), where(i)),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for i, t in enumerate(tools)
    ]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return {**schema, "x-guidance": _JSON_STYLE}


def _xml_call(tools: list[dict[str, Any]]) -> str:
    """The Lark rules of one XML call to one of ``tools``: ``call`` and the rules it uses."""
    rules = ["call: " + " | ".join(f"fn{i}" for i in range(len(tools)))]
    for i, tool in enumerate(tools):
        schema = tool.get("parameters") or {}
        properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        required = set(schema.get("required") or ())
        params = []
        for j, key in enumerate(properties):
            rules += _xml_parameter(f"p{i}_{j}", key, schema)
            params.append(f"p{i}_{j}" if key in required else f"p{i}_{j}?")
        opening = _lark_string(f"{FUNCTION_OPEN}{tool['name']}>\n")
        rules.append(f"fn{i}: {opening} {' '.join(params)} {_lark_string(FUNCTION_CLOSE)}")
    return "\n".join(rules)


def _xml_parameter(rule: str, key: str, tool_schema: dict[str, Any]) -> list[str]:
    """``rule``: the ``<parameter=KEY>`` block of a tool's parameter, closing tag included; its
    value as the parameter's schema says: one of a string enum's values, any text up to the
    closing tag for another string (or a parameter of no type), else JSON of the schema."""
    opening, close = _lark_string(f"{PARAMETER_OPEN}{key}>\n"), _lark_string(f"\n{PARAMETER_CLOSE}\n")
    head = f"{rule}: {opening} {rule}v"
    schema = parameter_schema(tool_schema, key)
    types = json_types(schema)
    values = schema.get("enum") if isinstance(schema, dict) and isinstance(schema.get("enum"), list) else None
    if isinstance(schema, dict) and "const" in schema:
        values = [schema["const"]]
    if types == {"string"} and values and all(isinstance(v, str) for v in values):
        return [head, f"{rule}v: ({' | '.join(_lark_string(v) for v in values)}) {close}"]
    if not types or "string" in types:
        return [head, f"{rule}v[stop={close}]: /(?s:.*)/"]
    # the parameter's schema in place inside the tool's, so that the tool's refs still resolve
    pointer = "#/$defs/tool/properties/" + key.replace("~", "~0").replace("/", "~1")
    value = {
        "$ref": pointer,
        "$defs": {"tool": _rebased(closed(tool_schema), "#/$defs/tool")},
        "x-guidance": _JSON_STYLE,
    }
    return [head, f"{rule}v: {rule}j {close}", f"{rule}j: %json {json.dumps(value)}"]


# -- does any finite value fit? ------------------------------------------------------------------------


def finite(schema: Any) -> bool:
    """Whether some finite JSON value can fit ``schema``; False only when none can, because every
    way through it needs a value that needs another, without end (``{"type": "object", "properties":
    {"a": {"$ref": "#"}}, "required": ["a"]}``). What it does not model (formats, patterns, ranges,
    ``not``, refs it cannot resolve) it takes as satisfiable: the compiler judges those.

    The document's refs are solved as a least fixed point: none is satisfiable until shown to be
    from what is known of the others. A ref found unsatisfiable waits on the refs it was found so
    by, and is looked at again only when one of those turns out satisfiable (refs only ever turn
    that way), so each is judged a few times, not once per round per ref."""
    refs = _Refs(schema)
    waiting: dict[str, list[str]] = {}  # ref -> refs to judge again once it is satisfiable
    queue = list(refs.targets)
    while queue:
        ref = queue.pop()
        if refs.known[ref]:
            continue
        refs.consulted.clear()
        if _finite(refs.targets[ref], refs, top=True):
            refs.known[ref] = True
            queue += waiting.pop(ref, [])
        else:
            for by in refs.consulted:
                waiting.setdefault(by, []).append(ref)
    return _finite(schema, refs, top=True)


class _Refs:
    """A document's local refs: their targets, which are known satisfiable, and which unsatisfiable
    ones a judgement consulted."""

    def __init__(self, root: Any):
        self.targets: dict[str, Any] = {}
        _refs(root, root, self.targets, top=True)
        self.known = dict.fromkeys(self.targets, False)
        self.consulted: set[str] = set()

    def satisfiable(self, ref: str) -> bool:
        ok = self.known.get(ref, True)  # a ref that does not resolve: not ours to judge
        if not ok:
            self.consulted.add(ref)
        return ok


def _refs(node: Any, root: Any, out: dict[str, Any], top: bool = False) -> None:
    """Every local ``$ref`` under ``node`` that resolves in ``root``, with its target."""
    if isinstance(node, list):
        for s in node:
            _refs(s, root, out)
        return
    if not isinstance(node, dict) or ("$id" in node and not top):
        return
    for k, v in node.items():
        if k in _DATA:
            continue
        if k == "$ref" and isinstance(v, str) and v not in out:
            found, target = resolve(root, v)
            if found:
                out[v] = target
        elif k in _NAMED and isinstance(v, dict):
            for s in v.values():
                _refs(s, root, out)
        else:
            _refs(v, root, out)


def _finite(node: Any, refs: _Refs, top: bool = False) -> bool:
    """One schema, with each ref as satisfiable as ``refs`` knows. A part with an ``$id`` of its own
    resolves its refs elsewhere: taken as satisfiable."""
    if node is False:
        return False
    if not isinstance(node, dict) or ("$id" in node and not top):
        return True
    ref = node.get("$ref")
    if isinstance(ref, str) and not refs.satisfiable(ref):
        return False
    every = node.get("allOf")
    if isinstance(every, list) and not all(_finite(s, refs) for s in every):
        return False
    for key in ("anyOf", "oneOf"):
        alternatives = node.get(key)
        if isinstance(alternatives, list) and alternatives and not any(_finite(s, refs) for s in alternatives):
            return False
    if "const" in node or "enum" in node:
        return True
    kinds = node.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds if isinstance(kinds, list) else _TYPES
    return any(_finite_as(kind, node, refs) for kind in kinds)


def _finite_as(kind: Any, node: dict, refs: _Refs) -> bool:
    """Whether a value of this JSON type can fit ``node``."""
    if kind == "object":
        properties, required = node.get("properties"), node.get("required")
        if not isinstance(properties, dict) or not isinstance(required, list):
            return True
        return all(_finite(properties[n], refs) for n in required if isinstance(n, str) and n in properties)
    if kind == "array":
        prefix, rest = node.get("prefixItems"), node.get("items")
        if isinstance(rest, list):  # draft 4's tuples
            prefix, rest = rest, node.get("additionalItems")
        prefix = prefix if isinstance(prefix, list) else []
        least = node.get("minItems")
        least = least if isinstance(least, int) and not isinstance(least, bool) else 0
        if not all(_finite(s, refs) for s in prefix[:least]):
            return False
        return least <= len(prefix) or rest is None or _finite(rest, refs)
    return True


_ENDLESS = "each value it allows requires another inside it, without end"


def _lark_string(s: str) -> str:
    return json.dumps(s)


class Grammars:
    """Compiles grammars against one model's vocabulary, and keeps the last ``CACHED`` compiled ones
    by their text: a new sequence with a known grammar gets a copy of a fresh matcher, not a
    compile. Building the llguidance tokenizer reads the whole vocabulary (about a second for
    Qwen's 151k tokens), so it happens once, on first use. Thread-safe: requests are prepared on
    threads (cortex/engine/prepare.py)."""

    CACHED = 64

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: list[int], call_format: str = "json"):
        self._source = (tokenizer, vocab_size, sorted(eos_ids))
        self.call_format = call_format  # json | xml: how the model writes a tool call
        kept = {t.content for t in tokenizer.get_added_tokens_decoder().values() if not t.special}
        # a tag the vocabulary keeps as one token is written as that token (llguidance's <name>)
        self._tags = {tag: tag if tag in kept else _lark_string(tag) for tag in (TOOL_OPEN, TOOL_CLOSE)}
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

    def _matcher(self, grammar: str, check: Callable[[], None] | None = None) -> llg.LLMatcher:
        with self._lock:
            fresh = self._compiled.get(grammar)
            if fresh is not None:
                self._compiled.move_to_end(grammar)
                return fresh.deep_copy()
        if check is not None:  # checks of what compiles but cannot be served, once per grammar
            check()
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

            def check_schema() -> None:
                if not finite(rules.json_schema):
                    raise GrammarError(f"no finite JSON value fits the schema ({_ENDLESS})")

            grammar = llg.LLMatcher.grammar_from_json_schema(schema)
            return Constraint(self._matcher(grammar, check_schema), None)
        tools = rules.tools

        def check_tools() -> None:
            for t in tools:
                if not finite(t.get("parameters") or {}):
                    raise GrammarError(f"tool {t['name']!r}: no finite JSON value fits its parameters ({_ENDLESS})")

        body = self._call_body(tools)
        if rules.tool_mode == "required":
            opener = self._tags[TOOL_OPEN]
            repeat = f'("\\n" {opener} body)*' if rules.parallel else ""
            lark = f"start: {opener} body {repeat}\n{body}"
            return Constraint(self._matcher(llg.LLMatcher.grammar_from_lark(lark), check_tools), None)
        # auto: free text until the model opens a call; each call's body is then constrained
        grammar = llg.LLMatcher.grammar_from_lark(f"start: body\n{body}")
        self._matcher(grammar, check_tools)  # compile once now, so a bad schema is a 400 before generation
        return Constraint(None, lambda: self._matcher(grammar), rules.parallel)

    def _call_body(self, tools: list[dict[str, Any]]) -> str:
        call = _xml_call(tools) if self.call_format == "xml" else f"call: %json {json.dumps(_call_schema(tools))}"
        return f'body: "\\n" call "\\n" {self._tags[TOOL_CLOSE]}\n{call}'


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


class ReasoningBudget:
    """A reasoning span closed after ``budget`` tokens (Anthropic's ``thinking.budget_tokens``): from
    then the only tokens allowed are those of ``close`` (``</think>`` and a blank line), one by one.
    The span is the one the prompt opened (``opened``), else the first one the output opens itself
    (Qwen3's own templates end at the assistant's turn and the model writes ``<think>``): its tokens
    count from the one that completes the tag. Whatever else constrains the output (``inner``: a tool
    call or schema) applies as before, and alone once the span is closed."""

    def __init__(self, inner: Constraint | None, budget: int, close: list[int], opened: bool = True):
        self.inner, self.budget, self.close = inner, budget, close
        self.spent, self.forced = 0, 0  # reasoning tokens so far; close tokens forced so far
        self.open = opened and bool(close)
        self.waiting = not opened and bool(close)  # for the output to open its span
        self._tail = b""

    def mask(self) -> bytes | None:
        if self.open and self.spent >= self.budget:
            token = self.close[self.forced]
            bits = bytearray(token // 8 + 1)
            bits[token // 8] = 1 << (token % 8)
            return bytes(bits)
        return self.inner.mask() if self.inner is not None else None

    def advance(self, token: int, token_bytes: bytes) -> None:
        if self.waiting:
            self._tail = (self._tail + token_bytes)[-32:]
            if self._tail.endswith(THINK_OPEN.encode()):
                self.waiting, self.open, self._tail = False, True, b""
        elif self.open:
            if self.spent >= self.budget:
                self.forced += 1
                self.open = self.forced < len(self.close)
            else:
                self.spent += 1
                self._tail = (self._tail + token_bytes)[-32:]
                self.open = not self._tail.endswith(THINK_CLOSE.encode())  # the model closed it itself
        if self.inner is not None:
            self.inner.advance(token, token_bytes)

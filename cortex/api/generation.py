"""The dialect-neutral middle of every generation endpoint.

A resource parses its dialect into a ``Submit``, starts it here, and renders what comes back: one
stream of ``Event``s per request, each choice's text already split into answer text, reasoning and
tool calls by the one output parser. Nothing in here knows OpenAI or Anthropic wire formats.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import falcon

from cortex.api.auth import key_id, presented_key
from cortex.api.engine_client import ClientGone, Generation
from cortex.chat.output import OutputParser, Part, Reasoning, Text
from cortex.fleet.proxy import CLIENT, HOP
from rpc.engine import Delta, Finished

log = logging.getLogger("cortex.front")


@dataclass
class Parts:
    index: int  # which choice
    parts: list[Part]
    logprobs: list[dict] | None = None


@dataclass
class Done:
    finished: Finished
    tool_calls: int  # tool calls the choice made
    reasoning_tokens: int  # of its completion tokens, those inside its reasoning span


@dataclass
class Ping:
    """Nothing happened for a while (a cold load, a long prefill): time for a keep-alive."""


Event = Parts | Done | Ping


@dataclass
class Choice:
    """A whole choice, for non-streamed answers."""

    parts: list[Part] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finished: Finished | None = None
    tool_calls: int = 0
    reasoning_tokens: int = 0


def events(
    gen: Generation, watch: object = None, keepalive_s: float | None = None, tools: bool = False
) -> Iterator[Event]:
    """The request's events. Parsers are made when the request starts, since a request that waited
    for its model learns only then whether its output opens inside a reasoning span.

    A choice's reasoning tokens are those of the deltas that were in its reasoning span when they
    began or ended (the tokens that open and close it included), and, if it ends inside it, the
    tokens no delta carried."""
    parsers: list[OutputParser] = []
    counted: list[int] = []  # per choice: completion tokens seen so far
    reasoning: list[int] = []  # per choice: those inside its reasoning span

    def parser(i: int) -> OutputParser:
        while len(parsers) <= i:
            parsers.append(OutputParser(reasoning=gen.reasoning, tools=tools))
            counted.append(0)
            reasoning.append(0)
        return parsers[i]

    def count(i: int, tokens: int, inside: bool) -> None:
        if inside:
            reasoning[i] += tokens - counted[i]
        counted[i] = tokens

    for ev in gen.events(watch=watch, keepalive_s=keepalive_s):
        if ev is None:
            yield Ping()
        elif isinstance(ev, Delta):
            p, parts, pieces = parser(ev.index), [], _pieces(ev)
            for text, tokens in pieces:
                before = p.mode
                parts += p.feed(text)
                count(ev.index, tokens, "reasoning" in (before, p.mode))
            yield Parts(ev.index, _joined(parts) if len(pieces) > 1 else parts, ev.logprobs)
        elif isinstance(ev, Finished):
            p = parser(ev.index)
            count(ev.index, ev.completion_tokens, p.mode == "reasoning")
            rest = p.finish()
            if rest:
                yield Parts(ev.index, rest)
            yield Done(ev, p.calls, reasoning[ev.index])


def _pieces(delta: Delta) -> list[tuple[str, int]]:
    """(text, completion tokens once it is out) of each token of a delta that made text, as if each
    had come in a delta of its own (a token that made none is counted with the next that does)."""
    if delta.pieces is None:
        return [(delta.text, delta.completion_tokens)]
    out, at, last = [], 0, len(delta.pieces) - 1
    for k, n in enumerate(delta.pieces):
        if n:
            out.append((delta.text[at : at + n], delta.completion_tokens - (last - k)))
        at += n
    return out or [(delta.text, delta.completion_tokens)]


def _joined(parts: list[Part]) -> list[Part]:
    """Neighbouring answer or reasoning texts as one part: a multi-step's tokens stay one event."""
    out: list[Part] = []
    for part in parts:
        if out and type(part) is type(out[-1]) and isinstance(part, (Text, Reasoning)):
            out[-1] = type(part)(out[-1].text + part.text)
        else:
            out.append(part)
    return out


def collect(gen: Generation, req: falcon.Request, tools: bool = False) -> list[Choice]:
    """Every choice in full. A client that hangs up while it waits cancels the request (499)."""
    choices = [Choice() for _ in range(gen.req.n)]
    try:
        for ev in events(gen, watch=req.env.get("gunicorn.socket"), tools=tools):
            if isinstance(ev, Parts):
                choices[ev.index].parts += ev.parts
                choices[ev.index].logprobs += ev.logprobs or []
            elif isinstance(ev, Done):
                choices[ev.finished.index].finished = ev.finished
                choices[ev.finished.index].tool_calls = ev.tool_calls
                choices[ev.finished.index].reasoning_tokens = ev.reasoning_tokens
    except ClientGone:
        log.info("%s: client went away; request cancelled", gen.req.request_id)
        raise falcon.HTTPStatus(499) from None  # nobody reads it; nginx's "client closed request"
    return choices


def merge_text(parts: list[Part], kind: type) -> str:
    return "".join(p.text for p in parts if isinstance(p, kind))


def client_id(req: falcon.Request) -> str:
    """Who is asking, for per-client limits: a hash of the API key if one is sent, else the address.
    A request a peer leader forwarded counts for the client that sent it there, not for the peer."""
    forwarded = req.get_header(CLIENT)
    if forwarded and getattr(req.context, "from_peer", False):
        return forwarded
    return client_name(presented_key(req), req.remote_addr or "")


def client_name(key: str | None, addr: str) -> str:
    """A client by its API key's hash (the same for either dialect's header, and never the key
    itself), else by its address."""
    return key_id(key) if key else "addr:" + addr


def forwarded(req: falcon.Request) -> bool:
    """A peer leader forwarded it (hop header): serve it here or fail, never forward it again. Any
    client may send the header; all it gets is a request that is not routed."""
    return req.get_header(HOP) is not None

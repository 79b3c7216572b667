"""Anthropic dialect: POST /v1/messages and /v1/messages/count_tokens (what Claude Code speaks).

Requests become the same ``Submit`` the OpenAI resources build; responses are rendered from the
same parsed parts (text, thinking, tool use), never by way of the OpenAI wire format.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import falcon

from cortex.api import sse
from cortex.api.engine_client import EngineClient, Generation
from cortex.api.errors import ApiError, bad_field
from cortex.api.generation import Choice, Done, Parts, Ping, client_id, collect, events, forwarded
from cortex.api.validation import field, read_json
from cortex.chat.output import Reasoning, Text, ToolCall
from rpc.engine import Finished, Submit
from rpc.messages import SamplingParams


def _text_blocks(content: Any, where: str) -> str:
    """A string, or text blocks (a system prompt, a tool result)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_field(where, f"{where}: expected a string or an array of text blocks.")
    texts = []
    for j, b in enumerate(content):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            kind = b.get("type") if isinstance(b, dict) else type(b).__name__
            raise bad_field(f"{where}.{j}", f"{where}.{j}: block type {kind!r} is not supported here; expected text.")
        texts.append(b["text"])
    return "\n".join(texts)


def parse_messages(body: dict) -> list[dict[str, Any]]:
    """Anthropic turns -> chat-template messages (tool results become ``tool`` messages)."""
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        out.append({"role": "system", "content": _text_blocks(system, "system")})
    messages = field(body, "messages", list, required=True)
    if not messages:
        raise bad_field("messages", "messages: at least one message is required.")
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise bad_field(where, f"{where}.role: expected 'user' or 'assistant'.")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise bad_field(f"{where}.content", f"{where}.content: expected a string or an array of content blocks.")
        out += _blocks(m["role"], content, f"{where}.content")
    return out


def _blocks(role: str, blocks: list, where: str) -> list[dict[str, Any]]:
    text, reasoning, calls, results = [], [], [], []
    for j, b in enumerate(blocks):
        kind = b.get("type") if isinstance(b, dict) else None
        at = f"{where}.{j}"
        if kind == "text" and isinstance(b.get("text"), str):
            text.append(b["text"])
        elif kind == "thinking" and role == "assistant":
            reasoning.append(str(b.get("thinking", "")))
        elif kind == "redacted_thinking" and role == "assistant":
            continue
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(b.get("name"), str) or not isinstance(b.get("input", {}), dict):
                raise bad_field(at, f"{at}: tool_use needs a name and an input object.")
            calls.append(
                {
                    "id": b.get("id"),
                    "type": "function",
                    "function": {"name": b["name"], "arguments": b.get("input", {})},
                }
            )
        elif kind == "tool_result" and role == "user":
            content = b.get("content", "")
            result = _text_blocks(content, f"{at}.content") if content else ""
            if b.get("is_error"):
                result = f"Error: {result}"
            results.append({"role": "tool", "tool_call_id": b.get("tool_use_id"), "content": result})
        elif kind in ("image", "document"):
            raise bad_field(at, f"{at}: {kind} blocks are not supported by this model.")
        else:
            raise bad_field(at, f"{at}: unexpected content block {kind!r} in a {role} message.")
    out: list[dict[str, Any]] = list(results)
    if text or calls or reasoning or not results:
        msg: dict[str, Any] = {"role": role, "content": "\n".join(text)}
        if calls:
            msg["tool_calls"] = calls
        if reasoning:
            msg["reasoning_content"] = "\n".join(reasoning)
        out.append(msg)
    return out


def parse_tools(body: dict) -> tuple[list[dict] | None, str, str | None, bool]:
    """(tools, tool_choice none|auto|required, forced name, parallel calls allowed)."""
    tools = []
    for i, t in enumerate(field(body, "tools", list) or []):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise bad_field(f"tools.{i}", f"tools.{i}: a tool needs a name.")
        if t.get("type") not in (None, "custom"):
            raise bad_field(f"tools.{i}", f"tools.{i}: server tool type {t['type']!r} is not supported.")
        schema = t.get("input_schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise bad_field(f"tools.{i}.input_schema", f"tools.{i}.input_schema: expected a JSON schema object.")
        tools.append({"name": t["name"], "description": t.get("description") or "", "parameters": schema})
    choice = field(body, "tool_choice", dict, default={"type": "auto"})
    kind = choice.get("type")
    parallel = not choice.get("disable_parallel_tool_use", False)
    if kind in ("auto", "none"):
        return tools or None, kind, None, parallel
    if kind == "any":
        return tools or None, "required", None, parallel
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or name not in {t["name"] for t in tools}:
            raise bad_field("tool_choice", f"tool_choice.name: {name!r} is not one of the tools.")
        return tools, "required", name, parallel
    raise bad_field("tool_choice", "tool_choice.type: expected auto, any, tool or none.")


def parse_thinking(body: dict) -> bool:
    """Anthropic models think only when asked to; so do ours (Qwen3's switch)."""
    thinking = field(body, "thinking", dict)
    if thinking is None:
        return False
    kind = thinking.get("type")
    if kind not in ("enabled", "disabled", "adaptive"):
        raise bad_field("thinking", "thinking.type: expected enabled or disabled.")
    return kind != "disabled"


def parse_submit(body: dict, req: falcon.Request, max_tokens_required: bool = True) -> Submit:
    number = (int, float)
    tools, tool_choice, tool_name, parallel = parse_tools(body)
    stops = field(body, "stop_sequences", list)
    if stops is not None and not all(isinstance(s, str) for s in stops):
        raise bad_field("stop_sequences", "stop_sequences: expected an array of strings.")
    return Submit(
        request_id=f"msg_{uuid.uuid4().hex[:24]}",
        model=field(body, "model", str, required=True),
        messages=parse_messages(body),
        sampling=SamplingParams(
            temperature=float(field(body, "temperature", number, default=1.0, lo=0, hi=1)),
            top_p=float(field(body, "top_p", number, default=1.0, lo=0, hi=1)),
            top_k=field(body, "top_k", int, default=0, lo=0),
            seed=field(body, "seed", int),  # an extension: reproducible sampling, as in the OpenAI dialect
        ),
        max_tokens=field(body, "max_tokens", int, required=max_tokens_required, lo=1),
        stop=stops or None,
        client=client_id(req),
        tools=tools,
        tool_choice=tool_choice,
        tool_name=tool_name,
        parallel_tool_calls=parallel,
        thinking=parse_thinking(body),
        hop=forwarded(req),
    )


class Messages:
    def __init__(self, engine: EngineClient, max_body_bytes: int, keepalive_s: float):
        self.engine, self.max_body_bytes, self.keepalive_s = engine, max_body_bytes, keepalive_s

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_json(req, self.max_body_bytes)
        submit = parse_submit(body, req)
        stream = field(body, "stream", bool, default=False)
        tools = bool(submit.tools) and submit.tool_choice != "none"
        gen = self.engine.submit(submit, req.context.get("record"))
        if stream:
            resp.content_type = "text/event-stream"
            resp.set_headers(sse.HEADERS)
            resp.stream = self._stream(gen, tools)
            return
        choice = collect(gen, req, tools=tools)[0]
        resp.media = {
            "id": submit.request_id,
            "type": "message",
            "role": "assistant",
            "model": submit.model,
            "content": _content(choice, submit.thinking),
            **_stop(choice.finished, choice.tool_calls),
            "usage": _usage(choice.finished),
        }

    def _stream(self, gen: Generation, tools: bool) -> Iterator[bytes]:
        submit = gen.req
        try:
            yield sse.named(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": submit.request_id,
                        "type": "message",
                        "role": "assistant",
                        "model": submit.model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": gen.prompt_tokens, "output_tokens": 0},
                    },
                },
            )
            blocks = _BlockWriter(submit.thinking)
            for ev in events(gen, keepalive_s=self.keepalive_s, tools=tools):
                if isinstance(ev, Ping):
                    yield sse.named("ping", {"type": "ping"})
                elif isinstance(ev, Parts):
                    for part in ev.parts:
                        yield from blocks.write(part)
                elif isinstance(ev, Done):
                    yield from blocks.close()
                    f = ev.finished
                    yield sse.named(
                        "message_delta",
                        {"type": "message_delta", "delta": _stop(f, ev.tool_calls), "usage": _usage(f)},
                    )
                    yield sse.named("message_stop", {"type": "message_stop"})
        except ApiError as err:  # mid-stream: Anthropic sends an `error` event and ends the stream
            yield sse.named("error", err.body("anthropic"))
        finally:
            gen.close()


class _BlockWriter:
    """Turns parts into content blocks: consecutive parts of one kind share a block."""

    def __init__(self, show_thinking: bool):
        self.index, self.open = -1, None
        self.show_thinking = show_thinking

    def write(self, part: Text | Reasoning | ToolCall) -> Iterator[bytes]:
        if isinstance(part, Reasoning) and not self.show_thinking:
            return
        kind = {Text: "text", Reasoning: "thinking", ToolCall: "tool_use"}[type(part)]
        if kind != self.open or kind == "tool_use":
            yield from self.close()
            self.index, self.open = self.index + 1, kind
            yield sse.named(
                "content_block_start",
                {"type": "content_block_start", "index": self.index, "content_block": _empty_block(part)},
            )
        if isinstance(part, Text):
            delta = {"type": "text_delta", "text": part.text}
        elif isinstance(part, Reasoning):
            delta = {"type": "thinking_delta", "thinking": part.text}
        else:
            delta = {"type": "input_json_delta", "partial_json": part.arguments_json}
        yield sse.named("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})

    def close(self) -> Iterator[bytes]:
        if self.open is None:
            return
        if self.open == "thinking":  # Anthropic signs thinking; there is nothing to sign here
            delta = {"type": "signature_delta", "signature": ""}
            yield sse.named("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})
        yield sse.named("content_block_stop", {"type": "content_block_stop", "index": self.index})
        self.open = None


def _tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


def _empty_block(part: Text | Reasoning | ToolCall) -> dict:
    if isinstance(part, Text):
        return {"type": "text", "text": ""}
    if isinstance(part, Reasoning):
        return {"type": "thinking", "thinking": "", "signature": ""}
    return {"type": "tool_use", "id": _tool_use_id(), "name": part.name, "input": {}}


def _content(choice: Choice, show_thinking: bool) -> list[dict]:
    blocks: list[dict] = []
    for part in choice.parts:
        if isinstance(part, ToolCall):
            blocks.append({"type": "tool_use", "id": _tool_use_id(), "name": part.name, "input": part.arguments})
        elif isinstance(part, Reasoning):
            if not show_thinking:
                continue
            if blocks and blocks[-1]["type"] == "thinking":
                blocks[-1]["thinking"] += part.text
            else:
                blocks.append({"type": "thinking", "thinking": part.text, "signature": ""})
        elif blocks and blocks[-1]["type"] == "text":
            blocks[-1]["text"] += part.text
        else:
            blocks.append({"type": "text", "text": part.text})
    return blocks


def _stop(finished: Finished, tool_calls: int) -> dict:
    if finished.finish_reason == "length":
        reason = "max_tokens"
    elif tool_calls:
        reason = "tool_use"
    elif finished.stop_sequence is not None:
        reason = "stop_sequence"
    else:
        reason = "end_turn"
    return {"stop_reason": reason, "stop_sequence": finished.stop_sequence if reason == "stop_sequence" else None}


def _usage(finished: Finished) -> dict:
    return {
        "input_tokens": finished.prompt_tokens - finished.cached_tokens,
        "output_tokens": finished.completion_tokens,
        "cache_read_input_tokens": finished.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


class CountTokens:
    def __init__(self, engine: EngineClient, max_body_bytes: int):
        self.engine, self.max_body_bytes = engine, max_body_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_json(req, self.max_body_bytes)
        submit = parse_submit(body, req, max_tokens_required=False)
        submit.count_only = True
        resp.media = {"input_tokens": self.engine.count_tokens(submit)}

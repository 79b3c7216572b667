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
from cortex.api.bodies import (
    AnthropicCountTokensRequest,
    AnthropicDocumentBlock,
    AnthropicImageBlock,
    AnthropicMessagesRequest,
    AnthropicPrompt,
    AnthropicRedactedThinkingBlock,
    AnthropicTextBlock,
    AnthropicThinkingBlock,
    AnthropicToolResultBlock,
    AnthropicToolUseBlock,
    Block,
)
from cortex.api.engine_client import EngineClient, Generation
from cortex.api.errors import ApiError, bad_field
from cortex.api.generation import Choice, Done, Parts, Ping, client_id, collect, events, forwarded
from cortex.api.validation import check_schema, decode
from cortex.chat.output import Reasoning, Text, ToolCall
from rpc.engine import Finished, Submit
from rpc.messages import SamplingParams


def _text(content: str | list[AnthropicTextBlock]) -> str:
    """A string, or text blocks (a system prompt, a tool result)."""
    return content if isinstance(content, str) else "\n".join(b.text for b in content)


# Claude Code's first system block: a billing header that changes on every request and carries
# nothing for the model; kept in the prompt it would defeat the prefix cache
BILLING_HEADER = "x-anthropic-billing-header:"


def _system_text(content: str | list, where: str) -> str:
    """A system prompt or a system entry of ``messages``: its text, less any billing header."""
    if isinstance(content, str):
        return "" if content.startswith(BILLING_HEADER) else content
    texts = []
    for j, b in enumerate(content):
        if not isinstance(b, AnthropicTextBlock):
            at = f"{where}.{j}"
            raise bad_field(at, f"{at}: block type {b.__struct_config__.tag!r} is not supported here; expected text.")
        if not b.text.startswith(BILLING_HEADER):
            texts.append(b.text)
    return "\n".join(texts)


def parse_messages(body: AnthropicPrompt) -> list[dict[str, Any]]:
    """Anthropic turns -> chat-template messages (tool results become ``tool`` messages). System
    entries among the messages (Claude Code sends them mid-conversation) join the system prompt, in
    order: most templates take a system message first or not at all."""
    system = [_system_text(body.system, "system")] if body.system is not None else []
    out: list[dict[str, Any]] = []
    for i, m in enumerate(body.messages):
        if m.role == "system":
            system.append(_system_text(m.content, f"messages.{i}.content"))
        elif isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
        else:
            out += _blocks(m.role, m.content, f"messages.{i}.content")
    system = [t for t in system if t]
    if system:
        out.insert(0, {"role": "system", "content": "\n\n".join(system)})
    return out


_ONLY = {  # block types only one side of the conversation sends
    AnthropicThinkingBlock: "assistant",
    AnthropicRedactedThinkingBlock: "assistant",
    AnthropicToolUseBlock: "assistant",
    AnthropicToolResultBlock: "user",
}


def _blocks(role: str, blocks: list[Block], where: str) -> list[dict[str, Any]]:
    text, reasoning, calls, results = [], [], [], []
    for j, b in enumerate(blocks):
        kind, at = b.__struct_config__.tag, f"{where}.{j}"
        if isinstance(b, (AnthropicImageBlock, AnthropicDocumentBlock)):
            raise bad_field(at, f"{at}: {kind} blocks are not supported by this model.")
        if _ONLY.get(type(b), role) != role:
            raise bad_field(at, f"{at}: unexpected content block {kind!r} in a {role} message.")
        if isinstance(b, AnthropicTextBlock):
            text.append(b.text)
        elif isinstance(b, AnthropicThinkingBlock):
            reasoning.append(b.thinking)
        elif isinstance(b, AnthropicToolUseBlock):
            calls.append({"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}})
        elif isinstance(b, AnthropicToolResultBlock):
            result = _text(b.content) if b.content else ""
            if b.is_error:
                result = f"Error: {result}"
            results.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": result})
    out: list[dict[str, Any]] = list(results)
    if text or calls or reasoning or not results:
        msg: dict[str, Any] = {"role": role, "content": "\n".join(text)}
        if calls:
            msg["tool_calls"] = calls
        if reasoning:
            msg["reasoning_content"] = "\n".join(reasoning)
        out.append(msg)
    return out


def parse_tools(body: AnthropicPrompt) -> tuple[list[dict] | None, str, str | None, bool]:
    """(tools, tool_choice none|auto|required, forced name, parallel calls allowed)."""
    for i, t in enumerate(body.tools or []):
        check_schema(t.input_schema, f"tools.{i}.input_schema")
    tools = [
        {
            "name": t.name,
            "description": t.description or "",
            "parameters": t.input_schema,
        }
        for t in body.tools or []
    ]
    choice = body.tool_choice
    kind = choice.type if choice else "auto"
    parallel = not (choice and choice.disable_parallel_tool_use)
    if kind in ("auto", "none"):
        return tools or None, kind, None, parallel
    if kind == "any":
        return tools or None, "required", None, parallel
    if choice.name not in {t["name"] for t in tools}:
        raise bad_field("tool_choice", f"tool_choice.name: {choice.name!r} is not one of the tools.")
    return tools, "required", choice.name, False  # the one call asked for, not the same call again


def parse_submit(body: AnthropicPrompt, req: falcon.Request) -> Submit:
    tools, tool_choice, tool_name, parallel = parse_tools(body)
    return Submit(
        request_id=f"msg_{uuid.uuid4().hex[:24]}",
        model=body.model,
        messages=parse_messages(body),
        sampling=SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed),
        max_tokens=body.max_tokens,
        stop=body.stop_sequences or None,
        client=client_id(req),
        tools=tools,
        tool_choice=tool_choice,
        tool_name=tool_name,
        parallel_tool_calls=parallel,
        # Anthropic models think only when asked to; so do ours (Qwen3's switch)
        thinking=body.thinking is not None and body.thinking.type != "disabled",
        reasoning_budget=body.thinking.budget_tokens if body.thinking and body.thinking.type == "enabled" else None,
        hop=forwarded(req),
    )


class Messages:
    def __init__(self, engine: EngineClient, max_body_bytes: int, keepalive_s: float):
        self.engine, self.max_body_bytes, self.keepalive_s = engine, max_body_bytes, keepalive_s

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = decode(req, AnthropicMessagesRequest, self.max_body_bytes)
        submit = parse_submit(body, req)
        tools = submit.tools if submit.tool_choice != "none" else None  # their schemas type the calls' arguments
        gen = self.engine.submit(submit, req.context.get("record"))
        if body.stream:
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
            **_stop(choice.finished, choice.tool_calls, submit.tool_choice == "required"),
            "usage": _usage(choice.finished),
        }

    def _stream(self, gen: Generation, tools: list[dict] | None) -> Iterator[bytes]:
        submit = gen.req
        forced = submit.tool_choice == "required"
        started = False
        try:
            blocks = _BlockWriter(submit.thinking)
            for ev in events(gen, keepalive_s=self.keepalive_s, tools=tools):
                if isinstance(ev, Ping):
                    yield sse.named("ping", {"type": "ping"})
                    continue
                if not started:  # once the first token is out, the prefix cache's share is known
                    started = True
                    yield _message_start(gen, ev.finished if isinstance(ev, Done) else None)
                if isinstance(ev, Parts):
                    for part in ev.parts:
                        yield from blocks.write(part)
                elif isinstance(ev, Done):
                    yield from blocks.close()
                    f = ev.finished
                    yield sse.named(
                        "message_delta",
                        {"type": "message_delta", "delta": _stop(f, ev.tool_calls, forced), "usage": _usage(f)},
                    )
                    yield sse.named("message_stop", {"type": "message_stop"})
        except ApiError as err:  # mid-stream: Anthropic sends an `error` event and ends the stream
            yield sse.named("error", err.body("anthropic"))
        finally:
            gen.close()


def _message_start(gen: Generation, finished: Finished | None) -> bytes:
    """``message_start``, its usage what ``message_delta`` will say (but the output tokens)."""
    prompt, cached = (
        (finished.prompt_tokens, finished.cached_tokens) if finished else (gen.prompt_tokens, gen.cached_tokens)
    )
    usage = {**_usage(Finished(gen.req.request_id, "", prompt, 0, cached)), "output_tokens": 0}
    message = {
        "id": gen.req.request_id,
        "type": "message",
        "role": "assistant",
        "model": gen.req.model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    return sse.named("message_start", {"type": "message_start", "message": message})


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


def _stop(finished: Finished, tool_calls: int, forced: bool = False) -> dict:
    """A forced call that is whole is the answer, even if the grammar let the model go on to the
    token limit (it allows more calls): ``tool_use``, the stop reason Claude Code acts on."""
    if tool_calls and (forced or finished.finish_reason != "length"):
        reason = "tool_use"
    elif finished.finish_reason == "length":
        reason = "max_tokens"
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
        submit = parse_submit(decode(req, AnthropicCountTokensRequest, self.max_body_bytes), req)
        submit.count_only = True
        record = req.context.get("record")  # the request log's (cortex/ops/reqlog.py)
        if record is not None:
            record.submitted(submit.request_id, submit.model, submit.client, submit.messages)
        try:
            tokens = self.engine.count_tokens(submit)
        except ApiError as err:
            if record is not None and err.code == "model_not_found":
                record.unknown_model()  # never a label value a client can invent
            raise
        if record is not None:
            record.prompt_tokens = tokens
        resp.media = {"input_tokens": tokens}

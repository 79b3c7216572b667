"""OpenAI dialect: POST /v1/chat/completions and /v1/completions, non-streamed and server-sent events."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import falcon

from cortex.api import sse
from cortex.api.bodies import (
    RESERVED_TEMPLATE_KWARGS,
    TOKEN_ID_END,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    OpenAIBody,
    TextPart,
    ToolCallIn,
)
from cortex.api.engine_client import EngineClient, Generation
from cortex.api.errors import ApiError, bad_field
from cortex.api.generation import Choice, Done, Parts, Ping, client_id, collect, events, forwarded, merge_text
from cortex.api.validation import check_schema, decode
from cortex.chat.output import Reasoning, Text, ToolCall
from rpc.engine import Finished, Submit
from rpc.messages import SamplingParams

log = logging.getLogger("cortex.front")


def _content_text(content: str | list[TextPart] | None) -> str:
    """OpenAI content: a string, or text parts (the only kind the declaration lets through)."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


def parse_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(messages):
        msg: dict[str, Any] = {
            "role": "system" if m.role == "developer" else m.role,
            "content": _content_text(m.content),
        }
        for extra in ("name", "tool_call_id", "reasoning_content"):
            if getattr(m, extra) is not None:
                msg[extra] = getattr(m, extra)
        if m.role == "assistant" and m.tool_calls is not None:
            msg["tool_calls"] = _parse_tool_calls(m.tool_calls, f"messages[{i}].tool_calls")
        out.append(msg)
    return out


def _parse_tool_calls(calls: list[ToolCallIn], where: str) -> list[dict]:
    """An assistant's earlier calls, with arguments as objects (templates render them as JSON)."""
    out = []
    for j, c in enumerate(calls):
        args = c.function.arguments
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                args = None
        if not isinstance(args, dict):
            raise bad_field(f"{where}[{j}].function.arguments", "Tool call arguments must be a JSON object.")
        out.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
    return out


def parse_tools(body: ChatCompletionRequest) -> tuple[list[dict] | None, str, str | None]:
    """(tools as {"name", "description", "parameters"}, tool_choice none|auto|required, forced name)."""
    for i, t in enumerate(body.tools or []):
        if t.function.parameters is not None:
            check_schema(t.function.parameters, f"tools[{i}].function.parameters")
    out = [
        {
            "name": t.function.name,
            "description": t.function.description or "",
            "parameters": t.function.parameters,
        }
        for t in body.tools or []
    ]
    choice = body.tool_choice
    if choice is None:
        return out or None, "auto", None
    if isinstance(choice, str):
        return out or None, choice, None
    name = choice.function.name
    if name not in {t["name"] for t in out}:
        raise bad_field("tool_choice", f"Tool choice names function '{name}', which is not in 'tools'.")
    return out, "required", name


def parse_response_format(body: ChatCompletionRequest) -> dict | None:
    """The JSON schema the output must follow: {} for json_object, None for text."""
    fmt = body.response_format
    kind = fmt.type if fmt else "text"
    if kind == "text":
        return None
    if kind == "json_object":
        return {}
    schema = fmt.json_schema.schema if fmt.json_schema else None
    if schema is None:
        raise bad_field("response_format", "'response_format.json_schema.schema' must be a JSON schema object.")
    check_schema(schema, "response_format.json_schema.schema")
    return schema


def parse_sampling(body: OpenAIBody, logprobs: int = -1) -> SamplingParams:
    bias = body.logit_bias
    return SamplingParams(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        min_p=body.min_p,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias={int(k): v for k, v in bias.items()} if bias else None,
        logprobs=logprobs,
    )


def parse_logprobs(body: ChatCompletionRequest) -> int:
    """-1 when not asked; else how many alternatives to report with each token (0..20)."""
    if not body.logprobs:
        if body.top_logprobs is not None:
            raise bad_field("top_logprobs", "'top_logprobs' requires 'logprobs' to be true.")
        return -1
    return body.top_logprobs or 0


def parse_template_kwargs(body: ChatCompletionRequest) -> dict[str, Any] | None:
    """Extra template variables; never one the renderer passes itself (a duplicate keyword)."""
    kwargs = body.chat_template_kwargs
    reserved = next((k for k in kwargs or () if k in RESERVED_TEMPLATE_KWARGS), None)
    if reserved is not None:
        raise bad_field(
            "chat_template_kwargs",
            f"'chat_template_kwargs' may not set '{reserved}': the server passes it to the chat template itself.",
        )
    return kwargs


def _stops(body: OpenAIBody) -> list[str] | None:
    return [body.stop] if isinstance(body.stop, str) else body.stop


class ChatCompletions:
    def __init__(self, engine: EngineClient, max_body_bytes: int, keepalive_s: float):
        self.engine, self.max_body_bytes, self.keepalive_s = engine, max_body_bytes, keepalive_s

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = decode(req, ChatCompletionRequest, self.max_body_bytes)
        messages = parse_messages(body.messages)
        tools, tool_choice, tool_name = parse_tools(body)
        submit = Submit(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            model=body.model,
            messages=messages,
            sampling=parse_sampling(body, parse_logprobs(body)),
            max_tokens=body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
            stop=_stops(body),
            template_kwargs=parse_template_kwargs(body),
            ignore_eos=body.ignore_eos,
            client=client_id(req),
            stop_token_ids=body.stop_token_ids,
            n=body.n,
            tools=tools,
            tool_choice=tool_choice,
            tool_name=tool_name,
            parallel_tool_calls=body.parallel_tool_calls,
            json_schema=parse_response_format(body),
            thinking=None if body.reasoning_effort is None else body.reasoning_effort != "none",
            hop=forwarded(req),
        )
        gen = self.engine.submit(
            submit, req.context.get("record")
        )  # raises ApiError (404, 400 too long, 429/503) up front
        parse_calls = tools if tool_choice != "none" else None  # their schemas type the calls' arguments
        created = int(time.time())
        if body.stream:
            resp.content_type = "text/event-stream"
            resp.set_headers(sse.HEADERS)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            resp.stream = self._stream(gen, created, include_usage, parse_calls)
            return
        choices = collect(gen, req, tools=parse_calls)
        want_logprobs = submit.sampling.logprobs >= 0
        resp.media = {
            "id": submit.request_id,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": [
                {
                    "index": i,
                    "message": _message(c),
                    "logprobs": {"content": c.logprobs} if want_logprobs else None,
                    "finish_reason": _finish_reason(c.finished, c.tool_calls),
                }
                for i, c in enumerate(choices)
            ],
            "usage": _usage([c.finished for c in choices]),
        }

    def _stream(self, gen: Generation, created: int, include_usage: bool, tools: list[dict] | None) -> Iterator[bytes]:
        submit = gen.req

        def chunk(index: int, delta: dict, finish_reason: str | None = None, logprobs: list | None = None) -> bytes:
            return sse.event(
                {
                    "id": submit.request_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": submit.model,
                    "choices": [
                        {
                            "index": index,
                            "delta": delta,
                            "logprobs": {"content": logprobs} if logprobs else None,
                            "finish_reason": finish_reason,
                        }
                    ],
                }
            )

        try:
            for i in range(submit.n):
                yield chunk(i, {"role": "assistant", "content": ""})
            finished = []
            for ev in events(gen, keepalive_s=self.keepalive_s, tools=tools):
                if isinstance(ev, Ping):
                    yield sse.KEEPALIVE
                elif isinstance(ev, Parts):
                    deltas = [_delta(p) for p in ev.parts] or ([{"content": ""}] if ev.logprobs else [])
                    for k, delta in enumerate(deltas):
                        yield chunk(ev.index, delta, logprobs=ev.logprobs if k == 0 else None)
                elif isinstance(ev, Done):
                    yield chunk(ev.finished.index, {}, _finish_reason(ev.finished, ev.tool_calls))
                    finished.append(ev.finished)
                    if include_usage and len(finished) == submit.n:
                        yield sse.event(
                            {
                                "id": submit.request_id,
                                "object": "chat.completion.chunk",
                                "created": created,
                                "model": submit.model,
                                "choices": [],
                                "usage": _usage(finished),
                            }
                        )
            yield sse.DONE
        except ApiError as err:  # mid-stream: OpenAI sends the error object as one more event
            yield sse.event(err.body())
        finally:
            gen.close()  # a client that went away cancels its request


def _delta(part: Text | Reasoning | ToolCall) -> dict:
    if isinstance(part, Text):
        return {"content": part.text}
    if isinstance(part, Reasoning):
        return {"reasoning_content": part.text}
    return {"tool_calls": [{"index": part.index, **_tool_call(part)}]}


def _tool_call(call: ToolCall) -> dict:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments_json},
    }


def _message(choice: Choice) -> dict:
    calls = [p for p in choice.parts if isinstance(p, ToolCall)]
    text = merge_text(choice.parts, Text)
    msg: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    reasoning = merge_text(choice.parts, Reasoning)
    if reasoning:
        msg["reasoning_content"] = reasoning
    if calls:
        msg["tool_calls"] = [_tool_call(c) for c in calls]
    return msg


def _finish_reason(finished: Finished, tool_calls: int) -> str:
    return "tool_calls" if tool_calls and finished.finish_reason == "stop" else finished.finish_reason


def _usage(finished: list[Finished]) -> dict:
    """The prompt counts once, however many choices were generated from it."""
    prompt, completion = finished[0].prompt_tokens, sum(f.completion_tokens for f in finished)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": min(f.cached_tokens for f in finished)},
    }


class Completions:
    """The legacy text completion: a raw prompt (text or token ids), no chat template."""

    def __init__(self, engine: EngineClient, max_body_bytes: int, keepalive_s: float):
        self.engine, self.max_body_bytes, self.keepalive_s = engine, max_body_bytes, keepalive_s

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = decode(req, CompletionRequest, self.max_body_bytes)
        text, ids = _parse_prompt(body.prompt)
        top = body.logprobs
        if body.echo and (body.stream or text is None):
            raise bad_field("echo", "'echo' is supported for a text prompt without streaming.")
        submit = Submit(
            request_id=f"cmpl-{uuid.uuid4().hex}",
            model=body.model,
            messages=[],
            sampling=parse_sampling(body, -1 if top is None else top),
            max_tokens=body.max_tokens,
            stop=_stops(body),
            ignore_eos=body.ignore_eos,
            client=client_id(req),
            stop_token_ids=body.stop_token_ids,
            n=body.n,
            prompt=text,
            prompt_ids=ids,
            hop=forwarded(req),
        )
        gen = self.engine.submit(submit, req.context.get("record"))
        created = int(time.time())
        if body.stream:
            resp.content_type = "text/event-stream"
            resp.set_headers(sse.HEADERS)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            resp.stream = self._stream(gen, created, include_usage, top is not None)
            return
        choices = collect(gen, req)
        resp.media = {
            "id": submit.request_id,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": [
                {
                    "index": i,
                    "text": (text if body.echo else "") + _all_text(c),
                    "logprobs": _legacy_logprobs(c.logprobs) if top is not None else None,
                    "finish_reason": c.finished.finish_reason,
                }
                for i, c in enumerate(choices)
            ],
            "usage": _usage([c.finished for c in choices]),
        }

    def _stream(self, gen: Generation, created: int, include_usage: bool, logprobs: bool) -> Iterator[bytes]:
        submit = gen.req

        def chunk(choices: list[dict], usage: dict | None = None) -> bytes:
            data = {
                "id": submit.request_id,
                "object": "text_completion",
                "created": created,
                "model": submit.model,
                "choices": choices,
            }
            if usage is not None:
                data["usage"] = usage
            return sse.event(data)

        try:
            finished = []
            for ev in events(gen, keepalive_s=self.keepalive_s):
                if isinstance(ev, Ping):
                    yield sse.KEEPALIVE
                elif isinstance(ev, Parts):
                    lp = _legacy_logprobs(ev.logprobs or []) if logprobs else None
                    yield chunk([{"index": ev.index, "text": _all_text(ev), "logprobs": lp, "finish_reason": None}])
                elif isinstance(ev, Done):
                    f = ev.finished
                    yield chunk([{"index": f.index, "text": "", "logprobs": None, "finish_reason": f.finish_reason}])
                    finished.append(f)
                    if include_usage and len(finished) == submit.n:
                        yield chunk([], _usage(finished))
            yield sse.DONE
        except ApiError as err:
            yield sse.event(err.body())
        finally:
            gen.close()


def _all_text(choice: Choice | Parts) -> str:
    """A raw completion has no reasoning or tool syntax of its own: every part is text."""
    return "".join(getattr(p, "text", "") for p in choice.parts)


def _parse_prompt(prompt: str | list) -> tuple[str | None, list[int] | None]:
    """A prompt is a string or a list of token ids (or a batch of one of either)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt, None
    if prompt and all(isinstance(t, int) for t in prompt):
        if not all(0 <= t < TOKEN_ID_END for t in prompt):
            raise bad_field("prompt", "Invalid 'prompt': token ids must be between 0 and the vocabulary size.")
        return None, prompt
    if len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise bad_field("prompt", "Batches of prompts are not supported; send one prompt per request.")
    raise bad_field("prompt", "Invalid 'prompt': expected a string or an array of token ids.")


def _legacy_logprobs(entries: list[dict]) -> dict:
    """Chat-style logprob entries in the completions API's columnar shape."""
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }

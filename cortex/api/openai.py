"""OpenAI dialect: POST /v1/chat/completions and /v1/completions, non-streamed and server-sent events."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import falcon

from cortex.api import sse
from cortex.api.engine_client import EngineClient, Generation
from cortex.api.errors import ApiError, bad_field
from cortex.api.generation import Choice, Done, Parts, Ping, client_id, collect, events, forwarded, merge_text
from cortex.api.validation import field, read_json
from cortex.chat.output import Reasoning, Text, ToolCall
from rpc.engine import Finished, Submit
from rpc.messages import SamplingParams

log = logging.getLogger("cortex.front")

ROLES = ("system", "developer", "user", "assistant", "tool")


def _content_text(content: Any, where: str) -> str:
    """OpenAI content: a string, or an array of parts of which we take the text ones."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise bad_field(
                    f"{where}[{j}]", f"Invalid content part at '{where}[{j}]': expected an object with a 'type'."
                )
            if part["type"] != "text":
                raise bad_field(f"{where}[{j}]", f"Content part type '{part['type']}' is not supported by this model.")
            if not isinstance(part.get("text"), str):
                raise bad_field(f"{where}[{j}].text", f"Missing or invalid 'text' in '{where}[{j}]'.")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_field(where, f"Invalid type for '{where}': expected a string or an array of content parts.")


def parse_messages(body: dict) -> list[dict[str, Any]]:
    messages = field(body, "messages", list, required=True)
    if not messages:
        raise bad_field("messages", "'messages' must contain at least one message.")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_field(where, f"Invalid type for '{where}': expected an object.")
        role = m.get("role")
        if role not in ROLES:
            raise bad_field(f"{where}.role", f"Invalid value for '{where}.role': expected one of {', '.join(ROLES)}.")
        msg = {
            "role": "system" if role == "developer" else role,
            "content": _content_text(m.get("content"), f"{where}.content"),
        }
        for extra in ("name", "tool_call_id", "reasoning_content"):
            if isinstance(m.get(extra), str):
                msg[extra] = m[extra]
        if role == "assistant" and m.get("tool_calls") is not None:
            msg["tool_calls"] = _parse_tool_calls(m["tool_calls"], f"{where}.tool_calls")
        out.append(msg)
    return out


def _parse_tool_calls(calls: Any, where: str) -> list[dict]:
    """An assistant's earlier calls, with arguments as objects (templates render them as JSON)."""
    if not isinstance(calls, list):
        raise bad_field(where, f"Invalid type for '{where}': expected an array.")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_field(f"{where}[{j}]", f"Invalid tool call at '{where}[{j}]': expected a function with a name.")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise bad_field(
                    f"{where}[{j}].function.arguments", "Tool call arguments must be a JSON object."
                ) from None
        if not isinstance(args, dict):
            raise bad_field(f"{where}[{j}].function.arguments", "Tool call arguments must be a JSON object.")
        out.append({"id": c.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def parse_tools(body: dict) -> tuple[list[dict] | None, str, str | None]:
    """(tools as {"name", "description", "parameters"}, tool_choice none|auto|required, forced name)."""
    tools = field(body, "tools", list)
    out = []
    for i, t in enumerate(tools or []):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_field(f"tools[{i}]", f"Invalid tool at 'tools[{i}]': expected a function with a name.")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise bad_field(f"tools[{i}].function.parameters", "Function parameters must be a JSON schema object.")
        out.append({"name": fn["name"], "description": fn.get("description") or "", "parameters": params})
    choice = body.get("tool_choice")
    if choice is None:
        return out or None, "auto", None
    if choice in ("none", "auto", "required"):
        return out or None, choice, None
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad_field("tool_choice", "'tool_choice' must be none, auto, required or a named function.")
    if fn["name"] not in {t["name"] for t in out}:
        raise bad_field("tool_choice", f"Tool choice names function '{fn['name']}', which is not in 'tools'.")
    return out, "required", fn["name"]


def parse_response_format(body: dict) -> dict | None:
    """The JSON schema the output must follow: {} for json_object, None for text."""
    fmt = field(body, "response_format", dict)
    kind = (fmt or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad_field("response_format", "'response_format.json_schema.schema' must be a JSON schema object.")
        return schema
    raise bad_field(
        "response_format", f"Unknown response_format type {kind!r}: expected text, json_object or json_schema."
    )


def parse_thinking(body: dict) -> bool | None:
    effort = field(body, "reasoning_effort", str)
    if effort is None:
        return None
    if effort not in ("none", "minimal", "low", "medium", "high"):
        raise bad_field("reasoning_effort", "'reasoning_effort' must be one of none, minimal, low, medium, high.")
    return effort != "none"


def parse_stop(body: dict) -> list[str] | None:
    stop = field(body, "stop", (str, list))
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > 4 or not all(isinstance(s, str) for s in stops):
        raise bad_field("stop", "'stop' must be a string or an array of at most 4 strings.")
    return stops


def parse_sampling(body: dict) -> SamplingParams:
    number = (int, float)
    return SamplingParams(
        temperature=float(field(body, "temperature", number, default=1.0, lo=0, hi=2)),
        top_p=float(field(body, "top_p", number, default=1.0, lo=0, hi=1)),
        top_k=field(body, "top_k", int, default=0, lo=0),
        seed=field(body, "seed", int),
        min_p=float(field(body, "min_p", number, default=0.0, lo=0, hi=1)),
        presence_penalty=float(field(body, "presence_penalty", number, default=0.0, lo=-2, hi=2)),
        frequency_penalty=float(field(body, "frequency_penalty", number, default=0.0, lo=-2, hi=2)),
        repetition_penalty=float(field(body, "repetition_penalty", number, default=1.0, lo=0.01, hi=10)),
        logit_bias=parse_logit_bias(body),
        logprobs=parse_logprobs(body),
    )


def parse_logprobs(body: dict) -> int:
    """-1 when not asked; else how many alternatives to report with each token (0..20)."""
    top = field(body, "top_logprobs", int, lo=0, hi=20)
    if not field(body, "logprobs", bool, default=False):
        if top is not None:
            raise bad_field("top_logprobs", "'top_logprobs' requires 'logprobs' to be true.")
        return -1
    return top or 0


def parse_logit_bias(body: dict) -> dict[int, float] | None:
    raw = field(body, "logit_bias", dict)
    if not raw:
        return None
    out = {}
    for key, value in raw.items():
        # ASCII digits only: str.isdigit() also takes superscripts, which int() refuses
        if not re.fullmatch(r"[0-9]{1,9}", str(key)) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad_field("logit_bias", "'logit_bias' maps token ids to numbers between -100 and 100.")
        if not -100 <= value <= 100:
            raise bad_field("logit_bias", f"Invalid logit_bias value {value} for token {key}: expected -100 to 100.")
        out[int(key)] = float(value)
    return out


def parse_stop_token_ids(body: dict) -> list[int] | None:
    ids = field(body, "stop_token_ids", list)
    if ids is not None and not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in ids):
        raise bad_field("stop_token_ids", "'stop_token_ids' must be an array of token ids.")
    return ids


class ChatCompletions:
    def __init__(self, engine: EngineClient, max_body_bytes: int, keepalive_s: float):
        self.engine, self.max_body_bytes, self.keepalive_s = engine, max_body_bytes, keepalive_s

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_json(req, self.max_body_bytes)
        model = field(body, "model", str, required=True)
        messages = parse_messages(body)
        stream = field(body, "stream", bool, default=False)
        n = field(body, "n", int, default=1, lo=1, hi=16)
        max_tokens = field(body, "max_completion_tokens", int, lo=1)
        if max_tokens is None:
            max_tokens = field(body, "max_tokens", int, lo=1)
        options = field(body, "stream_options", dict, default={})
        include_usage = bool(options.get("include_usage", False))
        tools, tool_choice, tool_name = parse_tools(body)
        submit = Submit(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            model=model,
            messages=messages,
            sampling=parse_sampling(body),
            max_tokens=max_tokens,
            stop=parse_stop(body),
            template_kwargs=field(body, "chat_template_kwargs", dict),
            ignore_eos=field(body, "ignore_eos", bool, default=False),
            client=client_id(req),
            stop_token_ids=parse_stop_token_ids(body),
            n=n,
            tools=tools,
            tool_choice=tool_choice,
            tool_name=tool_name,
            parallel_tool_calls=field(body, "parallel_tool_calls", bool, default=True),
            json_schema=parse_response_format(body),
            thinking=parse_thinking(body),
            hop=forwarded(req),
        )
        gen = self.engine.submit(
            submit, req.context.get("record")
        )  # raises ApiError (404, 400 too long, 429/503) up front
        parse_calls = bool(tools) and tool_choice != "none"
        created = int(time.time())
        if stream:
            resp.content_type = "text/event-stream"
            resp.set_headers(sse.HEADERS)
            resp.stream = self._stream(gen, created, include_usage, parse_calls)
            return
        choices = collect(gen, req, tools=parse_calls)
        want_logprobs = submit.sampling.logprobs >= 0
        resp.media = {
            "id": submit.request_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
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

    def _stream(self, gen: Generation, created: int, include_usage: bool, tools: bool) -> Iterator[bytes]:
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
        body = read_json(req, self.max_body_bytes)
        model = field(body, "model", str, required=True)
        text, ids = _parse_prompt(body)
        if body.get("suffix") is not None:
            raise bad_field("suffix", "'suffix' is not supported.")
        if body.get("best_of") not in (None, 1):
            raise bad_field("best_of", "'best_of' is not supported.")
        top = field(body, "logprobs", int, lo=0, hi=5)
        sampling = parse_sampling({k: v for k, v in body.items() if k not in ("logprobs", "top_logprobs")})
        if top is not None:
            sampling.logprobs = top
        stream = field(body, "stream", bool, default=False)
        echo = field(body, "echo", bool, default=False)
        if echo and (stream or text is None):
            raise bad_field("echo", "'echo' is supported for a text prompt without streaming.")
        submit = Submit(
            request_id=f"cmpl-{uuid.uuid4().hex}",
            model=model,
            messages=[],
            sampling=sampling,
            max_tokens=field(body, "max_tokens", int, default=16, lo=1),  # OpenAI's default for completions
            stop=parse_stop(body),
            ignore_eos=field(body, "ignore_eos", bool, default=False),
            client=client_id(req),
            stop_token_ids=parse_stop_token_ids(body),
            n=field(body, "n", int, default=1, lo=1, hi=16),
            prompt=text,
            prompt_ids=ids,
            hop=forwarded(req),
        )
        gen = self.engine.submit(submit, req.context.get("record"))
        created = int(time.time())
        options = field(body, "stream_options", dict, default={})
        if stream:
            resp.content_type = "text/event-stream"
            resp.set_headers(sse.HEADERS)
            resp.stream = self._stream(gen, created, bool(options.get("include_usage")), top is not None)
            return
        choices = collect(gen, req)
        resp.media = {
            "id": submit.request_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": i,
                    "text": (text if echo else "") + _all_text(c),
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


def _parse_prompt(body: dict) -> tuple[str | None, list[int] | None]:
    """A prompt is a string or a list of token ids (or a batch of one of either)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < 2**31 for t in prompt):
            raise bad_field("prompt", "Invalid 'prompt': token ids must be between 0 and the vocabulary size.")
        return None, prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise bad_field("prompt", "Batches of prompts are not supported; send one prompt per request.")
    if prompt is None:
        raise ApiError(400, "Missing required parameter: 'prompt'.", code="missing_required_parameter", param="prompt")
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

"""OpenAI dialect: POST /v1/chat/completions, non-streamed and server-sent events."""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import falcon

from cortex.api import sse
from cortex.api.engine_client import ClientGone, EngineClient
from cortex.api.errors import ApiError, bad_field
from cortex.api.validation import field, read_json
from rpc.engine import Delta, Finished, Submit
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
        for extra in ("name", "tool_call_id", "tool_calls"):
            if extra in m:
                msg[extra] = m[extra]
        out.append(msg)
    return out


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
        if not str(key).lstrip("-").isdigit() or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad_field("logit_bias", "'logit_bias' maps token ids to numbers between -100 and 100.")
        if not -100 <= value <= 100:
            raise bad_field("logit_bias", f"Invalid logit_bias value {value} for token {key}: expected -100 to 100.")
        out[int(key)] = float(value)
    return out


def parse_stop_token_ids(body: dict) -> list[int] | None:
    ids = field(body, "stop_token_ids", list)
    if ids is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise bad_field("stop_token_ids", "'stop_token_ids' must be an array of token ids.")
    return ids


class ChatCompletions:
    def __init__(self, engine: EngineClient, max_body_bytes: int):
        self.engine, self.max_body_bytes = engine, max_body_bytes

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
        submit = Submit(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            model=model,
            messages=messages,
            sampling=parse_sampling(body),
            max_tokens=max_tokens,
            stop=parse_stop(body),
            template_kwargs=field(body, "chat_template_kwargs", dict),
            ignore_eos=field(body, "ignore_eos", bool, default=False),
            client=_client_id(req),
            stop_token_ids=parse_stop_token_ids(body),
            n=n,
        )
        gen = self.engine.submit(submit)  # raises ApiError (404, 503 loading, 400 too long) up front
        created = int(time.time())
        if stream:
            resp.content_type = "text/event-stream"
            resp.set_headers(sse.HEADERS)
            resp.stream = self._stream(gen, submit, created, include_usage)
            return
        try:
            events = list(gen.events(watch=req.env.get("gunicorn.socket")))
        except ClientGone:
            log.info("%s: client went away; request cancelled", submit.request_id)
            raise falcon.HTTPStatus(499) from None  # nobody reads it; nginx's "client closed request"
        texts = [[] for _ in range(n)]
        logprobs: list[list] = [[] for _ in range(n)]
        finished: list[Finished] = [None] * n
        for ev in events:
            if isinstance(ev, Delta):
                texts[ev.index].append(ev.text)
                logprobs[ev.index] += ev.logprobs or []
            else:
                finished[ev.index] = ev
        want_logprobs = submit.sampling.logprobs >= 0
        resp.media = {
            "id": submit.request_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": "".join(texts[i])},
                    "logprobs": {"content": logprobs[i]} if want_logprobs else None,
                    "finish_reason": finished[i].finish_reason,
                }
                for i in range(n)
            ],
            "usage": _usage(finished),
        }

    def _stream(self, gen, submit: Submit, created: int, include_usage: bool) -> Iterator[bytes]:
        def chunk(delta: dict, finish_reason: str | None = None, logprobs: list | None = None, index: int = 0) -> bytes:
            lp = {"content": logprobs} if logprobs else None
            return sse.event(
                {
                    "id": submit.request_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": submit.model,
                    "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}],
                }
            )

        try:
            for i in range(submit.n):
                yield chunk({"role": "assistant", "content": ""}, index=i)
            finished = []
            for ev in gen.events():
                if isinstance(ev, Delta):
                    yield chunk({"content": ev.text}, logprobs=ev.logprobs, index=ev.index)
                elif isinstance(ev, Finished):
                    yield chunk({}, ev.finish_reason, index=ev.index)
                    finished.append(ev)
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


def _usage(finished: list[Finished]) -> dict:
    """The prompt counts once, however many choices were generated from it."""
    prompt, completion = finished[0].prompt_tokens, sum(f.completion_tokens for f in finished)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": min(f.cached_tokens for f in finished)},
    }


def _client_id(req: falcon.Request) -> str:
    """Who is asking, for per-client limits: a hash of the API key if one is sent, else the address."""
    key = req.get_header("Authorization") or req.get_header("X-Api-Key")
    if key:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]  # never the key itself
    return "addr:" + (req.remote_addr or "")

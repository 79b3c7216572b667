"""One log line and one count per generation request (and per token count, which prepares a prompt
as a generation does), written by the front when the request ends.

The front is where every request ends (including the ones refused before they reach the leader:
bad JSON, a missing key, 413), so it owns the request counter, the end-to-end latency and the log
line. ``RequestLog`` (Falcon middleware) opens a ``RequestRecord`` for each generation endpoint;
the engine client fills it (tokens as the API reports them, time of the first token, a failure
mid-stream); the record is closed when the response ends: at once for JSON answers, when the last
byte of a stream is sent (or the client leaves) for SSE.

Prompts and completions appear only with ``[logging] log_content = true``; API keys never do (the
client is named by a hash of its key, as the per-client limit names it).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import falcon

from cortex.ops import metrics

log = logging.getLogger("cortex.request")

# path -> (dialect, endpoint)
GENERATION_PATHS = {
    "/v1/chat/completions": ("openai", "chat"),
    "/v1/completions": ("openai", "completions"),
    "/v1/responses": ("openai", "responses"),
    "/v1/embeddings": ("openai", "embeddings"),  # the resource fills its record
    "/v1/messages": ("anthropic", "messages"),
    "/v1/messages/count_tokens": ("anthropic", "count_tokens"),  # the resource fills its record
}
CLIENT_CLOSED = 499  # nginx's "client closed request": nobody read the end


def request_ref(sent: str | None) -> str:
    """What names a request in its response (``request-id``, as Anthropic's API does, and
    ``x-request-id``): the client's own ``x-request-id`` when it is short printable ASCII, else new."""
    ok = sent is not None and 0 < len(sent) <= 128 and sent.isascii() and sent.isprintable()
    return sent if ok else f"req_{os.urandom(12).hex()}"  # as random as uuid4's, without its object


@dataclass
class RequestRecord:
    dialect: str
    endpoint: str
    node: str
    log_content: bool = False
    started: float = field(default_factory=time.monotonic)
    request_id: str = ""
    model: str = ""  # as the client named it, once the leader knows the name; "" before that
    client: str = ""
    first_token: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None  # the error code, when the request failed
    error_status: int | None = None  # a failure after a stream's headers went out
    gone: bool = False  # the client left before the end
    prompt: Any = None  # only with log_content
    completion: list[str] = field(default_factory=list)  # only with log_content
    # tokens generated so far, per choice: what a stream the client left (no Finished) is logged with
    produced: dict[int, int] = field(default_factory=dict)

    # -- filled by the engine client ------------------------------------------------------------------

    def submitted(self, request_id: str, model: str, client: str, prompt: Any) -> None:
        self.request_id, self.client = request_id, client
        self.model = model
        if self.log_content:
            self.prompt = prompt

    def unknown_model(self) -> None:
        self.model = ""  # never a label value a client can invent

    def admitted(self, prompt_tokens: int) -> None:
        """Admitted: the prompt's length is known before any token (a client may leave before one)."""
        self.prompt_tokens = prompt_tokens

    def delta(self, text: str, index: int = 0, completion_tokens: int | None = None, cached: int = 0) -> None:
        """``completion_tokens``: the choice's tokens so far (the leader's count, not the deltas')."""
        if self.first_token is None:
            self.first_token = time.monotonic()
        if self.log_content:
            self.completion.append(text)
        if completion_tokens is not None:
            self.produced[index] = completion_tokens
            self.completion_tokens = sum(self.produced.values())
            self.cached_tokens = cached if self.cached_tokens is None else min(self.cached_tokens, cached)

    def finished(
        self, prompt_tokens: int, completion_tokens: int, cached_tokens: int, reason: str, index: int = 0
    ) -> None:
        """One Finished per choice: the prompt counts once, completions add up, cached is the
        least any choice found (the usage the API returns)."""
        self.prompt_tokens = prompt_tokens
        if self.first_token is None and completion_tokens:  # its tokens came with the Finished alone
            self.first_token = time.monotonic()
        self.produced[index] = completion_tokens
        self.completion_tokens = sum(self.produced.values())
        self.cached_tokens = cached_tokens if self.cached_tokens is None else min(self.cached_tokens, cached_tokens)
        self.finish_reason = reason

    def failed(self, status: int, code: str | None) -> None:
        self.error_status, self.error = status, code or str(status)

    # -- closed by the middleware -----------------------------------------------------------------------

    def close(self, http_status: int) -> None:
        status = CLIENT_CLOSED if self.gone else (self.error_status or http_status)
        duration = time.monotonic() - self.started
        metrics.REQUESTS.labels(self.model, self.node, self.dialect, self.endpoint, str(status)).inc()
        metrics.REQUEST_DURATION.labels(self.model, self.dialect, self.endpoint).observe(duration)
        fields = {
            "id": self.request_id or None,
            "model": self.model or None,
            "dialect": self.dialect,
            "endpoint": self.endpoint,
            "status": status,
            "error": self.error,
            "finish": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens or 0,
            "ttft_ms": round((self.first_token - self.started) * 1000, 1) if self.first_token else None,
            "duration_ms": round(duration * 1000, 1),
            "client": self.client or None,
            "node": self.node,
        }
        if self.log_content:
            fields["prompt"] = self.prompt
            fields["completion"] = "".join(self.completion)
        log.info("request", extra={"fields": fields})


class RequestLog:
    """Falcon middleware: a record per generation request, closed when its response ends."""

    def __init__(self, node: str, log_content: bool):
        self.node, self.log_content = node, log_content

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        kind = GENERATION_PATHS.get(req.path)
        if kind is not None and req.method == "POST":
            req.context.record = RequestRecord(*kind, node=self.node, log_content=self.log_content)

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool) -> None:
        record: RequestRecord | None = req.context.get("record")
        if record is None:
            return
        status = resp.status_code
        if resp.stream is not None and status < 300:
            resp.stream = _closing(resp.stream, record, status)
        else:
            record.close(status)


def _closing(stream: Iterator[bytes], record: RequestRecord, status: int) -> Iterator[bytes]:
    """The stream, closing the record after its last byte, or when the server closes it early
    (the client went away)."""
    done = False
    try:
        yield from stream
        done = True
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
        record.gone = record.gone or not done
        record.close(status)

"""One error type for the API and its OpenAI envelope.

Resources raise ``ApiError``; Falcon's own errors (unknown route, wrong method) are rendered in the
same envelope, so a client never sees a body in another shape.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from http import HTTPStatus

import falcon

from rpc.engine import ContextOverflow, FailureKind, context_message

# leader failure kind -> (HTTP status, OpenAI error type, code)
FAILURES: dict[FailureKind, tuple[int, str, str | None]] = {
    FailureKind.MODEL_NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    FailureKind.MODEL_LOADING: (503, "service_unavailable", "model_loading"),
    # its file is broken or it does not fit its devices: final until an operator acts (x-should-retry: false)
    FailureKind.MODEL_FAILED: (500, "server_error", "model_load_failed"),
    FailureKind.CONTEXT_LENGTH_EXCEEDED: (400, "invalid_request_error", "context_length_exceeded"),
    FailureKind.INVALID_REQUEST: (400, "invalid_request_error", None),
    FailureKind.WORKER_FAILED: (503, "service_unavailable", "worker_failed"),
    FailureKind.OVERLOADED: (503, "service_unavailable", "overloaded"),
    FailureKind.SHUTTING_DOWN: (503, "service_unavailable", "shutting_down"),
    FailureKind.DRAINING: (503, "service_unavailable", "draining"),
    FailureKind.ENGINE_UNAVAILABLE: (503, "service_unavailable", "engine_unavailable"),
    FailureKind.CONFLICT: (409, "invalid_request_error", "conflict"),
    # no room for a model even after every eviction the policy allows (retry: residents may go idle)
    FailureKind.INSUFFICIENT_MEMORY: (503, "service_unavailable", "insufficient_memory"),
    # a model larger than a device's whole budget: retrying cannot help
    FailureKind.MODEL_TOO_LARGE: (507, "server_error", "model_too_large"),
    FailureKind.INTERNAL: (500, "server_error", "internal_error"),
    FailureKind.RATE_LIMITED: (429, "rate_limit_error", "rate_limit_exceeded"),
    FailureKind.FLEET_UNAVAILABLE: (503, "service_unavailable", "model_unavailable"),  # only on nodes that are down
    # an operator's command refused as a whole (the admin socket; never an HTTP request)
    FailureKind.REJECTED: (400, "invalid_request_error", "rejected"),
}


# failures that no retry can fix: clients are told so (x-should-retry: false, honoured by the
# OpenAI and Anthropic SDKs and by Claude Code), and given no Retry-After
FINAL = frozenset({FailureKind.MODEL_FAILED, FailureKind.MODEL_TOO_LARGE})
# statuses that are final whatever the cause (a bad body, key, path or size): the same header
FINAL_STATUSES = frozenset({400, 401, 403, 404, 405, 413, 422})


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
        final: bool = False,
        overflow: ContextOverflow | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code
        self.param, self.retry_after, self.final = param, retry_after, final
        self.overflow = overflow  # a context overflow's numbers: each dialect's text is made from them

    @classmethod
    def from_failure(
        cls, kind: FailureKind, message: str, retry_after: int | None = None, overflow: ContextOverflow | None = None
    ) -> ApiError:
        status, type_, code = FAILURES.get(kind, (500, "server_error", kind))
        if kind in FINAL:
            return cls(status, message, type_, code, final=True)
        return cls(status, message, type_, code, retry_after=retry_after, overflow=overflow)

    def body(self, dialect: str = "openai") -> dict:
        """The error in ``dialect``'s envelope; a context overflow is worded from its numbers."""
        if dialect == "anthropic":
            message = anthropic_context_message(self.overflow) if self.overflow else self.message
            return {"type": "error", "error": {"type": anthropic_type(self.status), "message": message}}
        message = context_message(self.overflow) if self.overflow else self.message
        return {"error": {"message": message, "type": self.type, "param": self.param, "code": self.code}}


def anthropic_context_message(over: ContextOverflow) -> str:
    """Anthropic's exact texts for a context overflow, which Claude Code acts on and only on: the
    first compacts the conversation, the second retries with a smaller max_tokens."""
    if over.max_tokens is None:
        return f"prompt is too long: {over.prompt_tokens} tokens > {over.limit} maximum"
    return (
        f"input length and `max_tokens` exceed context limit: {over.prompt_tokens} + {over.max_tokens} > "
        f"{over.limit}, decrease input length or `max_tokens` and try again"
    )


# Anthropic names its error types by status
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_type(status: int) -> str:
    return _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def dialect_of(req: falcon.Request) -> str:
    """Errors answer in the dialect of the endpoint the client called."""
    if req.path.startswith("/v1/messages"):
        return "anthropic"
    # the model list answers Anthropic's SDK (and Claude Code) in its shape, errors included
    anthropic_models = req.path.startswith("/v1/models") and req.get_header("anthropic-version") is not None
    return "anthropic" if anthropic_models else "openai"


def bad_field(param: str, message: str) -> ApiError:
    return ApiError(400, message, "invalid_request_error", "invalid_value", param=param)


def retry_headers(err: ApiError) -> list[tuple[str, str]]:
    """What an error tells a client about retrying it: when (Retry-After), or never."""
    headers = []
    if err.retry_after is not None:
        headers.append(("Retry-After", str(err.retry_after)))
    if err.final or err.status in FINAL_STATUSES:
        headers.append(("x-should-retry", "false"))
    return headers


def _render(req: falcon.Request, resp: falcon.Response, err: ApiError) -> None:
    resp.status = err.status
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(err.body(dialect_of(req)))
    for name, value in retry_headers(err):
        resp.set_header(name, value)


_PHRASES = {s.value: s.phrase for s in HTTPStatus}  # looked up once: HTTPStatus(n) costs ~10 us cold


def _phrase(status: int) -> str:
    """The reason phrase of an HTTP status line ("" for a status without one: the line may end
    after the code)."""
    return _PHRASES.get(status, "")


def whole_response(
    err: ApiError, dialect: str, headers: Iterable[tuple[str, str]] = (), reason: str = "", close: bool = True
) -> bytes:
    """The error as a whole HTTP/1.1 response, for code that answers on the socket without Falcon
    (gunicorn's own refusals, the forwarding fast path): the same envelope and retry headers."""
    body = json.dumps(err.body(dialect)).encode()
    fields = [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *retry_headers(err), *headers]
    if close:
        fields.insert(0, ("Connection", "close"))
    return response_head(err.status, fields, reason) + body


def response_head(status: int, fields: Iterable[tuple[str, str]], reason: str = "") -> bytes:
    """An HTTP/1.1 status line and header fields, as written on a socket without Falcon."""
    lines = "".join(f"{n}: {v}\r\n" for n, v in fields)
    return f"HTTP/1.1 {status} {reason or _phrase(status)}\r\n{lines}\r\n".encode("latin-1")


def handle_api_error(req, resp, err: ApiError, params) -> None:
    _render(req, resp, err)


def handle_http_error(req, resp, err: falcon.HTTPError, params) -> None:
    status = err.status_code
    type_ = "invalid_request_error" if status < 500 else "server_error"
    message = err.description or err.title or "error"
    if status == 404:
        message = f"Unknown request URL: {req.method} {req.path}."
    elif status == 405:
        message = f"Method {req.method} is not allowed on {req.path}."
    _render(req, resp, ApiError(status, message, type_, None))
    for name, value in (err.headers or {}).items():
        resp.set_header(name, value)


def handle_unexpected(req, resp, exc: Exception, params) -> None:
    import logging

    logging.getLogger("cortex.front").exception("unhandled error on %s %s", req.method, req.path)
    _render(req, resp, ApiError(500, "internal server error", "server_error", None))


def install(app: falcon.App) -> None:
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    app.add_error_handler(ApiError, handle_api_error)

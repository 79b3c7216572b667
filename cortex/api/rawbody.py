"""A request body as bytes and text, before its fields are checked (``cortex.api.validation``).

- Size: over the limit is a 413, whether the body states its length or comes chunked (no
  Content-Length: read up to the limit, never past it).
- Time: a body that stalls for ``BODY_TIMEOUT_S`` is a 408 (a client that stops sending half-way
  would hold a front thread for good; gunicorn already bounds the wait for headers).
- Depth: arrays and objects nested deeper than ``MAX_JSON_DEPTH`` are found in the bytes, without
  a parser. Every parser and encoder on a request's way (Python's json, msgspec here and on the
  wire to the leader, the leader's schema walks) recurses once per level, so unbounded depth is a
  RecursionError somewhere; bounded here, it is a 400 that names the field.
- Text: a lone surrogate (``"\\ud800"``), which Python's json reads but is no Unicode text (msgspec,
  the tokenizer and the wire refuse it), found with the path of the string that holds it.
"""

from __future__ import annotations

import contextlib
import json
import operator
import re
import socket
from itertools import accumulate, count
from typing import Any

import falcon

from cortex.api.errors import ApiError

# Arrays and objects one in another, the body itself counting as one. Far below what the parsers
# and the RPC codec carry (msgspec, like Python's json, stops at the interpreter's recursion limit:
# about 1,000 levels less the stack in use), and far above any real request: a tool's JSON schema
# starts 5 levels down and takes 2 per nested object.
MAX_JSON_DEPTH = 64
BODY_TIMEOUT_S = 30.0  # the longest pause between pieces of a body (nginx's client_body_timeout is 60 s)

_NOT_A_BRACKET = bytes(range(256)).translate(None, b"[]{}")  # bytes.translate's delete: all but brackets
_STEP = bytes.maketrans(b"[]{}", b"\x02\x00\x02\x00")  # an opening bracket 2, a closing one 0
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]', re.S)  # a string, a bracket or a comma
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def read_raw(req: falcon.Request, max_bytes: int) -> bytes:
    length = req.content_length
    if length is not None and length > max_bytes:
        raise ApiError(
            413,
            f"Request body of {length} bytes is larger than the limit of {max_bytes} bytes.",
            "invalid_request_error",
            "request_too_large",
        )
    raw = _read_in_time(req, max_bytes + 1)
    if len(raw) > max_bytes:
        raise ApiError(
            413,
            f"Request body is larger than the limit of {max_bytes} bytes.",
            "invalid_request_error",
            "request_too_large",
        )
    if not raw:
        raise ApiError(400, "The request body is empty; expected a JSON object.", code="invalid_json")
    req.context.raw_body = raw  # a request another leader serves is forwarded as the client sent it
    return raw


def _read_in_time(req: falcon.Request, limit: int) -> bytes:
    """At most ``limit`` bytes of the body, each read waiting at most BODY_TIMEOUT_S: a client that
    stops sending half-way gets a 408 and its thread back, instead of holding it for good."""
    sock = req.env.get("gunicorn.socket")
    before = sock.gettimeout() if sock is not None else None
    if sock is not None:
        sock.settimeout(BODY_TIMEOUT_S)
    try:
        if req.content_length is None and "chunked" in (req.get_header("Transfer-Encoding") or "").lower():
            return _read_to_end(req.stream, limit)  # the server ends the stream where the body ends
        return req.bounded_stream.read(limit)
    except TimeoutError:
        if sock is not None:  # the rest is never read: the connection ends after the answer
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
        raise ApiError(
            408, f"The request body did not arrive within {BODY_TIMEOUT_S:g} s.", code="request_timeout"
        ) from None
    finally:
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.settimeout(before)


def _read_to_end(stream: Any, limit: int) -> bytes:
    """At most ``limit`` bytes of a body of no stated length."""
    parts, size = [], 0
    while size < limit:
        part = stream.read(limit - size)
        if not part:
            break
        parts.append(part)
        size += len(part)
    return b"".join(parts)


def too_deep_at(raw: bytes) -> list[str | int] | None:
    """The keys and indexes down to the first container nested deeper than MAX_JSON_DEPTH ([] for
    the body itself), or None when there is none.

    At C speed: a body with fewer brackets than the limit (most of them) costs two counts. Else the
    strings go (escapes occur in strings only: once escaped backslashes and quotes are gone, quotes
    delimit them), then all but brackets; the depth is the most brackets open at once. Only a body
    too deep is read again, token by token, for the path."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return None
    utf8 = raw
    if raw[:4].count(0):  # UTF-16 or UTF-32, which Python's json reads
        try:
            utf8 = raw.decode(json.detect_encoding(raw), "surrogatepass").encode("utf-8", "surrogatepass")
        except (UnicodeError, LookupError):
            return None  # not text: the parser says so
    outside = utf8.replace(b"\\\\", b"").replace(b'\\"', b"").split(b'"')[::2]
    brackets = b"".join(outside).translate(None, _NOT_A_BRACKET)
    if brackets.count(b"[") + brackets.count(b"{") <= MAX_JSON_DEPTH:
        return None
    if max(map(operator.sub, accumulate(brackets.translate(_STEP)), count(1))) <= MAX_JSON_DEPTH:
        return None
    return _path_to_depth(utf8.decode("utf-8", "replace"), MAX_JSON_DEPTH + 1)


def _path_to_depth(text: str, depth: int) -> list[str | int]:
    """The keys and indexes down to the first container ``depth`` deep (the body is 1)."""
    stack: list[list] = []  # per open container: [bracket, its current key or index]
    for m in _TOKEN.finditer(text):
        token = m.group()
        if token in "[{":
            if len(stack) + 1 == depth:
                return [label for _, label in stack]
            stack.append([token, 0 if token == "[" else None])
        elif token in "]}":
            if stack:
                stack.pop()
        elif token == ",":
            if stack:
                stack[-1][1] = stack[-1][1] + 1 if stack[-1][0] == "[" else None
        elif stack and stack[-1][0] == "{" and stack[-1][1] is None:  # a string where a key goes
            try:
                stack[-1][1] = json.loads(token)
            except ValueError:
                stack[-1][1] = token[1:-1]
    return []


def lone_surrogate(value: Any, path: list[str | int] | None = None) -> tuple[list[str | int], str, bool] | None:
    """(the path, the surrogate, whether it is in a key) of the first string or key, in the body's
    order, that holds a lone surrogate (Python's json makes a valid pair one character)."""
    path = path or []
    if isinstance(value, str):
        m = _SURROGATE.search(value)
        return (path, m.group(), False) if m else None
    if isinstance(value, dict):
        for k, v in value.items():
            m = _SURROGATE.search(k)
            if m:
                return path, m.group(), True
            found = lone_surrogate(v, [*path, k])
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = lone_surrogate(v, [*path, i])
            if found:
                return found
    return None

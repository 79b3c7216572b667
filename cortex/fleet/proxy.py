"""The front's side of forwarding: send the client's original request to another leader and stream
its answer back as it arrives.

The client's raw body and path go as they came, so the peer parses them in the client's dialect and
answers in it; only the headers change: hop-by-hop ones and the client's credential are dropped,
the fleet's peer credential and a hop header are added. A peer that cannot be reached, or answers
5xx before any byte of a body, is reported to the leader (503, a busy or loading node, is not) and
the next target is tried (once). Once bytes flow, a failure ends the stream with the dialect's
error event: never a silent truncation. Every such failure also drops the front's copies of the
leader's answers that name the peer (``forget``, cortex/fleet/routes.py): the next request asks.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import falcon

from cortex.api import sse
from cortex.api.errors import ApiError, dialect_of, handle_api_error
from cortex.fleet.http import Answer, Connection, PeerError, Pool
from rpc.engine import Forward, Target

if TYPE_CHECKING:
    from cortex.ops.reqlog import RequestRecord

log = logging.getLogger("cortex.front")

HOP = "X-Cortex-Hop"  # the node that forwarded it: a request carrying it is never forwarded again
CLIENT = "X-Cortex-Client"  # who the original client is, for the peer's per-client limits
UPSTREAM = "X-Cortex-Upstream"  # on the response: the node that served it
FAILED_OVER = "X-Cortex-Failed-Over"  # on the response: the node tried first, which failed

# never forwarded: connection-level (RFC 9110 7.6.1), recomputed by the client library, or the
# client's own credential (replaced by the fleet's)
_DROP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "accept-encoding",
    "authorization",
    "x-api-key",
    HOP.lower(),
    CLIENT.lower(),
}


class ForwardTo(Exception):
    """Raised by the engine client when the leader answers ``Forward``; handled by ``Proxy``. A
    resource that catches it on the way may set ``patch`` (top-level body fields to add or replace
    for the peer) and ``tap``, which sees the answer (status, content type, bytes) before the client
    does: each piece of a stream before it is relayed, a JSON body whole (read to its end first),
    so what the tap keeps (the Responses API's copy of a forwarded response) is kept before the
    client can ask for it."""

    def __init__(self, forward: Forward):
        super().__init__(forward.reason)
        self.forward = forward
        self.patch: dict[str, Any] | None = None
        self.tap: Callable[[int, str, bytes], None] | None = None


@dataclass
class Early:
    """A request begun on a pooled connection (``Proxy.start``): ``rest`` is still to be written."""

    conn: Connection
    rest: bytes


@dataclass
class Sent:
    """A forwarded request that a target took: its connection, with the answer's head read."""

    target: Target
    conn: Connection
    answer: Answer
    failed: list[str]  # the nodes tried before it, which failed

    @property
    def is_sse(self) -> bool:
        return (self.answer.header("content-type") or "").startswith("text/event-stream")

    def head(self) -> tuple[int, list[tuple[str, str]], int | None]:
        """The status, headers and length of the client's answer: the peer's, less the headers
        that are the connection's, plus which node served it (and which failed first). The length
        is the peer's when it said one (None: unknown until the end, so the body goes chunked):
        the client learns the size as the peer said it, in one write, rather than a chunked body
        and then its end marker (a second small write a client would wait for)."""
        upstream = self.answer
        headers = [(n, v) for n, v in upstream.headers if n.lower() not in _DROP and n.lower() != "content-encoding"]
        headers.append((UPSTREAM, self.target.node))
        if self.failed:
            headers.append((FAILED_OVER, ", ".join(self.failed)))
        length = upstream.header("content-length")
        sized = length is not None and length.isdigit() and upstream.header("transfer-encoding") is None
        return upstream.status, headers, int(length) if sized else None


class Proxy:
    """One per front process; it keeps connections to peers open across requests (per thread)."""

    def __init__(
        self,
        node: str,
        report: Callable[[str, str], None],
        connect_timeout_s: float,
        read_timeout_s: float,
        client_of: Callable[[falcon.Request], str],
        forget: Callable[[str], None],
    ):
        """``report(endpoint, reason)`` tells the leader a peer failed; ``forget(endpoint)`` drops
        the routing answers this front keeps that name it."""
        self.node, self.report, self.client_of, self.forget = node, report, client_of, forget
        self.pool = Pool(connect_timeout_s, read_timeout_s)

    def handle(self, req: falcon.Request, resp: falcon.Response, ex: ForwardTo, params: dict) -> None:
        """Falcon error handler for ForwardTo: the response becomes the peer's. (An error handler
        that raises gets no further handling, so errors are rendered here.)"""
        try:
            self._forward(req, resp, ex)
        except ApiError as err:
            handle_api_error(req, resp, err, params)

    def _forward(self, req: falcon.Request, resp: falcon.Response, ex: ForwardTo) -> None:
        body = getattr(req.context, "raw_body", None)
        if body is None:
            raise ApiError(500, "cannot forward a request whose body was not kept", "server_error", None)
        if ex.patch:
            body = _patched(body, ex.patch)
        sent = self.open(req.method, req.relative_uri, req.headers.items(), self.client_of(req), body, ex.forward)
        status, headers, length = sent.head()
        resp.status = status
        for name, value in headers:
            resp.set_header(name, value)
        if length is not None:
            resp.content_length = length
        record = req.context.get("record")  # the request log's (cortex/ops/reqlog.py)
        if record is not None:
            record.node = sent.target.node  # counted for the node that served it
        resp.stream = self.chunks(sent, dialect_of(req) if sent.is_sse else None, record, ex.tap)

    def open(
        self,
        method: str,
        uri: str,
        headers: Iterable[tuple[str, str]],
        client: str,
        body: bytes,
        forward: Forward,
        early: Early | None = None,
    ) -> Sent:
        """Send the client's request to the first of ``forward``'s targets that takes it: one that
        cannot be reached, or answers 5xx before any byte of a body while another is left, is
        reported and the next one tried. Raises ApiError (503) when none takes it. ``early``: the
        request already begun on the first target (``start``)."""
        fields = self._fields(headers, client)
        targets = forward.targets
        failed: list[str] = []
        for i, target in enumerate(targets):
            last = i == len(targets) - 1
            sent = self._send(method, uri, fields, target, body, early if i == 0 else None)
            if sent is None:
                failed.append(target.node)
                continue
            conn, upstream = sent
            if upstream.status >= 500 and not last:  # refused before any byte: try the next one
                conn.close()
                self._refused(target, upstream.status)
                failed.append(target.node)
                continue
            return Sent(target, conn, upstream, failed)
        names = ", ".join(failed)
        raise ApiError(
            503,
            f"no node could serve the request now (tried {names})",
            "service_unavailable",
            "upstream_unavailable",
            retry_after=2,
        )

    def start(
        self, method: str, uri: str, headers: Iterable[tuple[str, str]], client: str, body: bytes, forward: Forward
    ) -> Early | None:
        """Begin the request on an idle pooled connection to the first target, writing what the
        socket takes at once: never waits (the front's main thread calls it, so the request is on
        its way before a request thread takes over). None when there is no idle connection or
        it would not take a byte; ``open`` then does it all."""
        target = forward.targets[0]
        if target.model:  # renaming the model parses and rewrites the body: not on that thread
            return None
        conn = self.pool.take_idle(target.endpoint)
        if conn is None:
            return None
        try:
            data = conn.encode(method, uri, *self._request_to(target, self._fields(headers, client), body))
        except ValueError:  # not one request on the wire: ``open`` says so
            conn.close()
            return None
        written = conn.send_now(data)
        if not written:  # closed by the peer, or a full socket: a fresh start in ``open``
            conn.close()
            return None
        return Early(conn, data[written:])

    def _fields(self, headers: Iterable[tuple[str, str]], client: str) -> dict[str, str]:
        """The client's header fields less the connection's and its credential, plus the hop's."""
        fields = {k: v for k, v in headers if k.lower() not in _DROP}
        fields[HOP] = self.node
        fields[CLIENT] = client
        return fields

    @staticmethod
    def _request_to(target: Target, fields: dict[str, str], body: bytes) -> tuple[bytes, dict[str, str]]:
        """The body and headers as ``target`` gets them: its model name, its credential."""
        if target.model:
            body = _rename(body, target.model)
        headers = dict(fields)
        if target.key:
            headers["Authorization"] = f"Bearer {target.key}"
        return body, headers

    def _send(
        self, method: str, uri: str, fields: dict[str, str], target: Target, body: bytes, early: Early | None
    ) -> tuple[Connection, Answer] | None:
        # the pool adds Host, Content-Length and Accept-Encoding: identity (relayed byte for byte)
        try:
            answer = None if early is None else self.pool.resume(early.conn, early.rest, method)
            if answer is not None:
                return early.conn, answer
            body, headers = self._request_to(target, fields, body)
            return self.pool.request(method, target.endpoint, uri, body, headers)
        except PeerError as exc:
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("forward to %s (%s) failed: %s", target.node, target.endpoint, reason)
            self._failed(target, reason)
            return None

    def _refused(self, target: Target, status: int) -> None:
        log.warning("forward to %s answered %d; failing over", target.node, status)
        if status == 503:  # a busy or loading node, not a broken one: the leader need not know
            self.forget(target.endpoint)
        else:
            self._failed(target, f"HTTP {status}")

    def _failed(self, target: Target, reason: str) -> None:
        self.forget(target.endpoint)
        self.report(target.endpoint, reason)

    def chunks(
        self,
        sent: Sent,
        sse_dialect: str | None,
        record: RequestRecord | None = None,
        tap: Callable[[int, str, bytes], None] | None = None,
    ) -> Iterator[bytes]:
        """The peer's bytes as they arrive (``read1``: whatever is there, no waiting for more).
        Closing this generator (the client went away) closes the upstream connection, which
        cancels the request on the peer. With ``tap``, the whole answer is also kept and handed
        to it once it has all arrived."""
        conn, upstream, target = sent.conn, sent.answer, sent.target
        ended_event = True
        ctype = upstream.header("content-type") or ""
        try:
            if tap is not None and sse_dialect is None:  # one JSON body: whole, then tapped, then relayed
                whole = upstream.read()
                self._tap(tap, upstream.status, ctype, whole, target)
                if whole:
                    yield whole
            while chunk := upstream.read1(65536):
                if record is not None and record.first_token is None:
                    record.first_token = time.monotonic()  # its first byte: as near as a proxy can tell
                ended_event = chunk.endswith(b"\n\n")
                if tap is not None:
                    self._tap(tap, upstream.status, ctype, chunk, target)
                yield chunk
            self.pool.release(target.endpoint, conn, upstream)
            conn = None
        except PeerError as exc:
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("stream from %s broke: %s", target.node, reason)
            self._failed(target, reason)
            if sse_dialect is not None:
                err = ApiError(
                    502,
                    f"the node serving this request ({target.node}) failed mid-stream: {reason}",
                    "server_error",
                    "upstream_failed",
                )
                if record is not None:
                    record.failed(err.status, err.code)
                yield (b"" if ended_event else b"\n\n") + error_event(err, sse_dialect)
        finally:
            if conn is not None:
                conn.close()

    @staticmethod
    def _tap(tap: Callable[[int, str, bytes], None], status: int, ctype: str, data: bytes, target: Target) -> None:
        try:
            tap(status, ctype, data)
        except Exception:  # what a tap keeps never costs the client its answer
            log.exception("a tap on the answer forwarded to %s failed", target.node)


def error_event(err: ApiError, dialect: str) -> bytes:
    """The dialect's mid-stream error: OpenAI sends the error object as one more data event,
    Anthropic an ``error`` event (as cortex/api/openai.py and anthropic.py do for local streams)."""
    if dialect == "anthropic":
        return sse.named("error", err.body("anthropic"))
    return sse.event(err.body())


def _patched(body: bytes, fields: dict[str, Any]) -> bytes:
    data = json.loads(body)
    data.update(fields)
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def _rename(body: bytes, model: str) -> bytes:
    data = json.loads(body)
    data["model"] = model
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()

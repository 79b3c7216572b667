"""The front's fast path for requests it forwards: one whose model another leader serves, by the
front's copy of its leader's answer (cortex/fleet/routes.py), goes to that leader as it came,
before gunicorn's parser, WSGI and Falcon are involved.

Why: on a gateway every routed request pays for the front twice, once on the way in and once on
the way back, and at one client that is the whole cost of the hop. Through gunicorn's request
parser, the WSGI environ, Falcon, the middleware and a resource that validates the body, a
forwarded request cost the gateway about 0.75 ms of CPU (cold caches: the gateway idles between
requests), most of the hop's 1-1.4 ms; this path costs about a third of that (docs/benchmarks.md).
Its first half runs on the worker's main thread as the connection turns readable, so the request
is on its way to the peer before a request thread has even been woken (see ``Relay``).

It takes only what it can read whole and plainly from the bytes that have arrived, and only peeks
at them until it has decided:

- a keep-alive connection's next request (the first request of a connection goes the ordinary way);
- ``POST`` to a generation endpoint, exactly (no query), HTTP/1.1, head and body at most 64 KiB;
- header fields that are tokens with printable ASCII values, each name at most once, none that
  changes how the request is framed or handled (Transfer-Encoding, Expect, Upgrade, the fleet's
  own hop headers), a plain Content-Length within the body limit, and the whole body there;
- a body that is a JSON object, no deeper than the API allows, with a string ``model``;
- a key the ordinary path would let through, and not the fleet's peer key;
- a model with a still valid ``Forward`` in the route cache.

Anything else is declined with nothing read, and gunicorn and Falcon serve it as before: every
refusal (401, 413, a bad body ...) stays theirs, in the caller's dialect. What it does serve, it
serves as the ordinary path would: the same proxy (targets in order, failover, a mid-stream error
event), headers (``request-id``, ``X-Cortex-Upstream`` ...) and request log line. The peer checks
the body as it checks any request, and answers in the caller's dialect.

Not taken: the Responses API (the front keeps its own copy of each response it forwards), TLS
(gunicorn's ``certfile``: no peeking into an encrypted stream), and everything while
``log_content`` is on (the log line then carries the prompt, which the ordinary path extracts).
"""

from __future__ import annotations

import json
import logging
import re
import socket
from dataclasses import dataclass

from cortex.api.auth import ApiKeys, key_in
from cortex.api.errors import ApiError, response_head, whole_response
from cortex.api.generation import client_name
from cortex.api.rawbody import too_deep_at
from cortex.fleet.proxy import CLIENT, HOP, Early, Proxy, Sent
from cortex.fleet.routes import RouteCache
from cortex.ops.reqlog import GENERATION_PATHS, RequestRecord, request_ref
from rpc.engine import Forward

log = logging.getLogger("cortex.front")

# the endpoints it takes, as bytes on the request line -> (dialect, endpoint) for the request log
PATHS = {p.encode(): kind for p, kind in GENERATION_PATHS.items() if p != "/v1/responses"}
MAX_HEAD = 16384
MAX_LINE, MAX_FIELD, MAX_FIELDS = 4094, 8190, 100  # gunicorn's own limits (a longer one is its 4xx)
# the most it peeks at: a larger request goes the ordinary way (the peek and the body's parse run on
# the worker's main thread, which must stay quick for every other connection)
PEEK = 1 << 16

# a field name (RFC 9110 5.6.2) without "_": gunicorn drops those, so X_Cortex_Hop never reaches Falcon
_TOKEN = re.compile(rb"[!#$%&'*+.^`|~0-9A-Za-z-]+")
_SURROGATE = re.compile(rb"\\u[dD][89abcdefABCDEF]")  # "\\ud800" and the like, as JSON escapes them
_VALUE = re.compile(rb"[\t\x20-\x7e]*")  # printable ASCII: nothing another parser could read otherwise
# fields whose requests go the ordinary way: they change the framing or what the request asks of
# this server, or they are the fleet's own (a request carrying them is a peer's, never forwarded)
_DECLINE = frozenset((b"transfer-encoding", b"expect", b"upgrade", b"te", b"trailer", HOP.lower().encode()))
_DECLINE |= {CLIENT.lower().encode()}
_IDS = frozenset(("request-id", "x-request-id"))


@dataclass
class Plain:
    """A request read whole from the bytes that have arrived."""

    path: str
    headers: list[tuple[str, str]]  # as sent
    fields: dict[bytes, bytes]  # lower-case name -> value
    body: bytes
    size: int  # bytes of head and body: what to take from the socket

    def field(self, name: bytes) -> str | None:
        value = self.fields.get(name)
        return None if value is None else value.decode("ascii")

    @property
    def wants_close(self) -> bool:
        return b"close" in self.fields.get(b"connection", b"").lower()


def read_plain(data: bytes, max_body: int) -> Plain | None:
    """The request at the start of ``data`` if it is one this path takes (see the module's doc),
    else None."""
    end = data.find(b"\r\n\r\n", 0, MAX_HEAD)
    if end < 0:
        return None
    lines = data[:end].split(b"\r\n")
    if lines[0].count(b" ") != 2 or len(lines[0]) > MAX_LINE or len(lines) > MAX_FIELDS + 1:
        return None
    method, path, version = lines[0].split(b" ")
    if method != b"POST" or version != b"HTTP/1.1" or path not in PATHS:
        return None
    fields: dict[bytes, bytes] = {}
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or len(line) > MAX_FIELD or not _TOKEN.fullmatch(name) or not _VALUE.fullmatch(value):
            return None
        key, value = name.lower(), value.strip(b" \t")
        if key in fields or key in _DECLINE:
            return None
        fields[key] = value
        headers.append((name.decode("ascii"), value.decode("ascii")))
    connection = fields.get(b"connection", b"keep-alive").lower()
    if connection not in (b"keep-alive", b"close"):
        return None
    length = fields.get(b"content-length", b"")
    if not length.isdigit() or len(length) > 12 or int(length) > max_body:
        return None
    size = end + 4 + int(length)
    if len(data) < size:
        return None
    return Plain(path.decode("ascii"), headers, fields, data[end + 4 : size], size)


def model_of(body: bytes) -> str | None:
    """The body's ``model`` when it is a JSON object the API could read, else None. A body with an
    escaped surrogate is left to the ordinary path too: it refuses a lone one (cortex/api/rawbody.py)
    and this path cannot tell one from a pair without reading every string."""
    if too_deep_at(body) is not None or _SURROGATE.search(body):
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


@dataclass
class Job:
    """A request the fast path took: what the request thread needs to finish it."""

    plain: Plain
    forward: Forward
    client: str
    dialect: str
    record: RequestRecord
    ids: list[tuple[str, str]]  # request-id and x-request-id
    keep: bool  # whether the connection may carry another request, as far as this one goes
    early: Early | None  # the request already begun on the first target


class Relay:
    """One per front process, beside the Falcon app and sharing its proxy, route cache and keys.

    In two halves: ``begin`` on the gunicorn worker's main thread when a keep-alive connection turns
    readable (it never waits: it peeks, decides, takes the request and writes it to an idle pooled
    connection to the peer), ``finish`` on a request thread (the answer, relayed as it arrives). So
    the request is on its way to the peer before a request thread is even woken."""

    def __init__(self, proxy: Proxy, routes: RouteCache, keys: ApiKeys, node: str, max_body: int):
        self.proxy, self.routes, self.keys = proxy, routes, keys
        self.node, self.max_body = node, min(max_body, PEEK)

    def take(self, sock: socket.socket, addr: str, may_keep: bool) -> bool | None:
        """``begin`` and ``finish`` in turn: None, declined; else whether the connection goes on."""
        job = self.begin(sock, addr, may_keep)
        return None if job is None else self.finish(sock, job)

    def begin(self, sock: socket.socket, addr: str, may_keep: bool, may_start: bool = True) -> Job | None:
        """Take the request waiting on ``sock`` if this path takes it, and start it on its way;
        None: declined, nothing read. ``may_keep``: whether the server would keep the connection
        after this request; ``may_start``: whether a request thread is free to read the answer
        (if not, the request waits for one unsent, as the ordinary path's would). Never waits."""
        if not len(self.routes):  # nothing forwarded lately (always so on a node serving alone)
            return None
        plain = self._peek(sock)
        if plain is None or not self._may_name_a_cached_model(plain.body):
            return None
        key = key_in(plain.field(b"authorization"), plain.field(b"x-api-key"))
        try:
            if self.keys.check("POST", plain.path, key, hop=False):
                return None  # the fleet's key without the hop header: not a client of this path
        except ApiError:
            return None  # refused: in the ordinary path's words
        model = model_of(plain.body)
        ref = request_ref(plain.field(b"x-request-id"))
        forward = self.routes.lookup(model, ref) if model is not None else None
        if forward is None:
            return None
        dialect, endpoint = PATHS[plain.path.encode()]
        record = RequestRecord(dialect, endpoint, self.node)
        client = client_name(key, addr)
        record.submitted(ref, model, client, None)
        ids = [("request-id", ref), ("x-request-id", ref)]
        job = Job(plain, forward, client, dialect, record, ids, may_keep and not plain.wants_close, None)
        # the last step that may decline: once the bytes are taken, the job is the request's only copy
        if not _take_bytes(sock, plain.size):
            return None  # the client went away half-way: the ordinary path reads its end
        if not may_start:
            return job
        try:
            job.early = self.proxy.start("POST", plain.path, plain.headers, client, plain.body, forward)
        except Exception:  # the request is taken: ``finish`` still answers it, starting afresh
            log.exception("starting the forward of %s failed", plain.path)
        return job

    def finish(self, sock: socket.socket, job: Job) -> bool:
        """Relay the peer's answer to the job's request (a blocking socket); whether the
        connection may carry another request."""
        plain, record, keep = job.plain, job.record, job.keep
        try:
            sent = self.proxy.open("POST", plain.path, plain.headers, job.client, plain.body, job.forward, job.early)
        except Exception as exc:  # the request is taken: it gets an answer whatever went wrong
            if not isinstance(exc, ApiError):
                log.exception("forwarding %s failed", plain.path)
            err = exc if isinstance(exc, ApiError) else ApiError(500, "internal server error", "server_error", None)
            record.close(err.status)
            try:
                sock.sendall(whole_response(err, job.dialect, job.ids, close=not keep))
            except OSError:
                return False
            return keep
        record.node = sent.target.node
        return self._answer(sock, sent, job)

    def _peek(self, sock: socket.socket) -> Plain | None:
        """The request waiting on ``sock``, read without taking it, if it is one this path takes."""
        try:
            data = sock.recv(PEEK, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:  # nothing there yet, or the client is gone: the ordinary path sees to it
            return None
        return read_plain(data, self.max_body)

    def _may_name_a_cached_model(self, body: bytes) -> bool:
        """False when the body surely names no model the cache holds, found without parsing it: a
        node serving some models itself and forwarding others does not parse its own requests'
        bodies twice. (A name written with JSON escapes is missed: that request goes the ordinary
        way.) With many names cached, parsing is the cheaper test."""
        names = self.routes.names()
        return len(names) > 16 or any(b'"%s"' % name.encode() in body for name in names)

    def _answer(self, sock: socket.socket, sent: Sent, job: Job) -> bool:
        """Relay the peer's answer as it arrives: its head with the client's own headers, then its
        body (chunked when the peer said no length). Whether the connection may go on."""
        status, headers, length = sent.head()
        headers = [(n, v) for n, v in headers if n.lower() not in _IDS]  # the peer's: this node's replace them
        bodyless = status in (204, 304)
        chunked = length is None and not bodyless
        framing = [("Content-Length", str(length))] if length is not None else []
        framing += [("Transfer-Encoding", "chunked")] if chunked else []
        framing += [] if job.keep else [("Connection", "close")]
        pending = response_head(status, [*headers, *job.ids, *framing])
        chunks = self.proxy.chunks(sent, job.dialect if sent.is_sse else None, job.record)
        relayed, whole = 0, False
        try:
            for piece in chunks:
                relayed += len(piece)
                sock.sendall(pending + (b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece))
                pending = b""
            # a body cut short by the peer cannot be mended: only closing says it is short (a
            # stream's end is mended: it ended with the dialect's error event)
            cut = not sent.answer.done and not sent.is_sse
            sock.sendall(pending + (b"0\r\n\r\n" if chunked and not cut else b""))
            whole = not cut and (length is None or relayed == length)
        except OSError:
            job.record.gone = True  # the client left; closing the chunks closes the peer's connection
        finally:
            chunks.close()
            job.record.close(status)
        return job.keep and whole


def _take_bytes(sock: socket.socket, size: int) -> bool:
    """Read the ``size`` bytes a peek has seen (in the socket's buffer: no waiting); False when
    they are not all there after all (the client is gone)."""
    view = memoryview(bytearray(size))
    got = 0
    while got < size:
        try:
            n = sock.recv_into(view[got:], size - got, socket.MSG_DONTWAIT)
        except OSError:
            n = 0
        if not n:
            return False
        got += n
    return True

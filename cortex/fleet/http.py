"""A small keep-alive HTTP/1.1 client for talking to peer leaders, on plain sockets.

Why not a client library, nor the standard library's ``http.client``: a forwarded request is on the
latency path of every routed request. httpx costs about 1.2 ms per call on the 2-core test box,
``http.client`` about 0.15 ms of CPU (most of it parsing the answer's headers through the ``email``
package), this client about 0.04 ms (``bench/gateway.py``, docs/benchmarks.md). What the fleet
needs is small: one request written in one ``sendall``, the status line and headers read with the
buffered reader's C ``readline``, a body framed by Content-Length, chunks or the connection's end
(RFC 9112 section 6), pooled connections, a connect timeout apart from the read timeout, and one
retry when a pooled connection turns out to have been closed by the peer while it sat idle.

Strict where a lenient reader could be fooled: a garbled answer (a status, length or chunk size that
is not plain digits, Content-Length fields that disagree, more than 16 interim answers) is a
PeerProtocolError, never a ValueError, and the connection is not reused; a pooled connection with
anything waiting on it (an end, or bytes the last answer left) is closed rather than reused; a
request that went out whole is sent again only if it is safe to repeat (GET, HEAD, OPTIONS); a
request line or header that would not be one request on the wire is refused before it is sent.
"""

from __future__ import annotations

import re
import select
import socket
import ssl
import threading
import time
import urllib.parse


class PeerProtocolError(Exception):
    """The peer's answer is not HTTP/1.1 as this client reads it (a garbled or truncated answer)."""


class _Unsent(ConnectionError):
    """The request could not be written on a pooled connection (the peer had closed it): the peer
    never read it whole, so it may go again on a new connection."""


class _Unanswered(PeerProtocolError):
    """The peer closed the connection after the request went out, before any byte of an answer:
    it may or may not have acted on it, so only a request that is safe to repeat goes again."""


PeerError = (OSError, PeerProtocolError)  # anything a dead, closing or garbling peer raises
_SEND_FAILED = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
_IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS"))
_MAX_LINE = 65536  # longest status, header or chunk-size line read from a peer
_MAX_HEADERS = 200
_MAX_INTERIM = 16  # 1xx answers skipped before the final one
_NO_BODY = frozenset((204, 304))
_STATUS = re.compile(r"HTTP/1\.[01] ([1-9][0-9]{2})(?: .*)?")
_DIGITS = re.compile(r"[0-9]+")
_HEX = re.compile(r"[0-9A-Fa-f]+")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a header name or method (RFC 9110 5.6.2)
_TARGET = re.compile(r"[!-~]+")  # a request target: visible ASCII, no space or control


class Answer:
    """A peer's answer: status and headers read, the body for the caller to read (``read1`` or
    ``read``) to its end; then ``done`` is true and the connection may carry another request."""

    def __init__(self, rfile, method: str):
        self._rfile = rfile
        self.status, self.headers, version = _read_head(rfile)
        fields: dict[str, list[str]] = {}  # by lower-case name: every value, in order
        for name, value in self.headers:
            fields.setdefault(name.lower(), []).append(value)
        self._fields = fields
        conn_opts = ",".join(fields.get("connection", ())).lower()
        self.will_close = "close" in conn_opts or (version == "HTTP/1.0" and "keep-alive" not in conn_opts)
        codings = [c.strip().lower() for c in ",".join(fields.get("transfer-encoding", ())).split(",") if c.strip()]
        self.chunked = bool(codings) and codings[-1] == "chunked"
        self._left: int | None = None  # bytes left of a sized body or of the current chunk
        self.done = False
        if method == "HEAD" or self.status in _NO_BODY:
            self.done = True
        elif codings:  # RFC 9112 6.3: it overrides a Content-Length, and the connection then ends
            self.will_close = self.will_close or "content-length" in fields or version == "HTTP/1.0"
            if self.chunked:
                self._left = 0
            else:  # a coding other than chunked last: the body runs to the connection's end
                self.will_close = True
        elif "content-length" in fields:
            self._left = _content_length(fields["content-length"])
            self.done = self._left == 0
        else:  # the body runs to the connection's end
            self.will_close = True

    def header(self, name: str) -> str | None:
        """The first value of the named header field (any case), or None."""
        values = self._fields.get(name.lower())
        return values[0] if values else None

    def read1(self, n: int = 65536) -> bytes:
        """Body bytes already here (at most ``n``; one socket read if none are); b"" at its end."""
        if self.done:
            return b""
        if self._left is None:  # to the connection's end
            data = self._rfile.read1(n)
            self.done = not data
            return data
        if self.chunked and self._left == 0 and not self._next_chunk():
            return b""
        data = self._rfile.read1(min(n, self._left))
        if not data:
            raise PeerProtocolError("the peer closed the connection before the end of its answer")
        self._left -= len(data)
        if self._left == 0:
            if not self.chunked:
                self.done = True
            elif self._rfile.readline(_MAX_LINE) not in (b"\r\n", b"\n"):
                raise PeerProtocolError("a chunk does not end with CRLF")
        return data

    def read(self, limit: int | None = None) -> bytes:
        """The rest of the body; more than ``limit`` bytes (None: no limit) is a PeerProtocolError."""
        parts, size = [], 0
        while data := self.read1():
            size += len(data)
            if limit is not None and size > limit:
                raise PeerProtocolError(f"the answer's body is larger than {limit} bytes")
            parts.append(data)
        return b"".join(parts)

    def _next_chunk(self) -> bool:
        """Read the next chunk's size line; False (and the trailers read) after the last one."""
        line = self._rfile.readline(_MAX_LINE)
        size = line.split(b";", 1)[0].strip().decode("latin-1")
        if not line.endswith(b"\n") or not _HEX.fullmatch(size):
            raise PeerProtocolError(f"bad chunk size line {line[:40]!r}")
        self._left = int(size, 16)
        if self._left:
            return True
        for _ in range(_MAX_HEADERS):  # trailers, up to the blank line that ends the message
            line = self._rfile.readline(_MAX_LINE)
            if line in (b"\r\n", b"\n"):
                self.done = True
                return False
            if not line:
                break
        raise PeerProtocolError("the chunked body did not end")


def _content_length(values: list[str]) -> int:
    """The body's length from its Content-Length field(s): repeats must agree (RFC 9112 6.3)."""
    lengths = {v.strip() for value in values for v in value.split(",")}
    if len(lengths) != 1 or not _DIGITS.fullmatch(next(iter(lengths))):
        raise PeerProtocolError(f"bad Content-Length {', '.join(values)[:60]!r}")
    return int(lengths.pop())


def _read_head(rfile) -> tuple[int, list[tuple[str, str]], str]:
    """Status, header fields and version of the next final answer (1xx interim answers skipped)."""
    for interim in range(_MAX_INTERIM + 1):
        line = rfile.readline(_MAX_LINE)
        if not line and not interim:
            raise _Unanswered("the peer closed the connection before answering")
        status = _STATUS.fullmatch(line.decode("latin-1").rstrip("\r\n")) if line.endswith(b"\n") else None
        if status is None:
            raise PeerProtocolError(f"bad status line {line[:60]!r}")
        headers = _read_fields(rfile)
        code = int(status.group(1))
        if code >= 200 or code == 101:
            return code, headers, line[:8].decode("latin-1")
    raise PeerProtocolError(f"more than {_MAX_INTERIM} interim (1xx) answers")


def _read_fields(rfile) -> list[tuple[str, str]]:
    """Header fields up to the blank line; a continuation line (obs-fold) joins the field before it
    with a space, as RFC 9112 5.2 asks of a client."""
    headers: list[tuple[str, str]] = []
    while (field := rfile.readline(_MAX_LINE)) not in (b"\r\n", b"\n"):
        if not field.endswith(b"\n") or len(headers) >= _MAX_HEADERS:
            raise PeerProtocolError("the answer's header is cut short or too large")
        text = field.decode("latin-1")
        if text[0] in " \t" and headers:
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {text.strip()}".strip())
            continue
        name, colon, value = text.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise PeerProtocolError(f"bad header line {field[:60]!r}")
        headers.append((name, value.strip()))
    return headers


class Connection:
    """One keep-alive connection to a peer: a request goes out in one write, its answer comes back
    through a buffered reader kept with the socket."""

    def __init__(self, sock: socket.socket, host: str):
        self.sock, self.host = sock, host
        self._rfile = sock.makefile("rb")

    def request(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Answer:
        """Send a request; return its answer once the status line and headers are in. Raises
        ValueError for a request that would not be one request on the wire (a line break or
        space where none may be: a request smuggled into another), before anything is sent."""
        return self.finish(self.encode(method, path, body, headers), method)

    def encode(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> bytes:
        """The request as it goes on the wire (ValueError: see ``request``)."""
        if not _TOKEN.fullmatch(method) or not _TARGET.fullmatch(path):
            raise ValueError(f"not a request line: {method[:20]!r} {path[:60]!r}")
        if any(not _TOKEN.fullmatch(k) or "\n" in v or "\r" in v or "\0" in v for k, v in headers.items()):
            raise ValueError("a header field name is not a token, or its value holds a line break")
        fields = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        length = f"Content-Length: {len(body)}\r\n" if body is not None else ""
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n{fields}{length}Accept-Encoding: identity\r\n\r\n"
        return head.encode("latin-1") + (body or b"")

    def send_now(self, data: bytes) -> int | None:
        """Write what the socket takes of ``data`` without waiting: how many bytes (0: none yet),
        or None when the peer has closed the connection (nothing was sent)."""
        timeout = self.sock.gettimeout()
        self.sock.setblocking(False)
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError:
            return None
        finally:
            self.sock.settimeout(timeout)

    def finish(self, rest: bytes, method: str) -> Answer:
        """Write the request, or the rest of one ``send_now`` began, and read its answer's head."""
        if rest:
            try:
                self.sock.sendall(rest)
            except _SEND_FAILED as exc:  # the peer never had it whole
                raise _Unsent(str(exc)) from exc
        return Answer(self._rfile, method)

    def reusable(self) -> bool:
        """Whether this idle connection can carry another request: nothing has come on it since it
        was given back ``drained``, neither an end (the peer closed it) nor stray bytes. (One
        system call: this is on the way of every forwarded request.)"""
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return False
        poller = select.poll()  # not select.select: it fails for descriptors past 1023
        poller.register(self.sock, select.POLLIN)
        return not poller.poll(0)

    def drained(self) -> bool:
        """Whether nothing is left to read after an answer read to its end: bytes beyond it, in
        the reader's buffer or the socket, would be taken for the next answer."""
        timeout = self.sock.gettimeout()
        self.sock.setblocking(False)  # the reader's buffer only: a non-blocking socket read finds nothing
        try:
            return not self._rfile.peek(1)
        except ssl.SSLWantReadError:  # TLS for "nothing there": its records are all read
            return True
        except OSError:
            return False
        finally:
            self.sock.settimeout(timeout)

    def close(self) -> None:
        self._rfile.close()
        self.sock.close()


class Pool:
    """Idle keep-alive connections by endpoint, shared by every thread of the process: a request
    takes the one used last (LIFO: warm, and the least likely to have been closed by the peer
    while idle), and gives it back when its answer was read to the end.

    (It was a pool per thread: with gunicorn workers of 64-128 request threads taking requests in
    turn, every thread kept a connection of its own to each peer, and each thread's first request
    to a peer paid for a new one.)"""

    def __init__(
        self,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_idle: int = 256,
        idle_s: float = 4.0,
        tls: ssl.SSLContext | None = None,
    ):
        """``tls``: how https peers are checked (None: the system's trusted authorities)."""
        self.connect_timeout_s, self.read_timeout_s = connect_timeout_s, read_timeout_s
        # at most ``max_idle`` idle connections per endpoint; one idle longer than ``idle_s`` is not
        # reused (gunicorn, as cortex runs it, closes a keep-alive connection idle for 5 s)
        self.max_idle, self.idle_s = max_idle, idle_s
        self._idle: dict[str, list[tuple[float, Connection]]] = {}
        self._lock = threading.Lock()
        self._tls = tls

    def take_idle(self, endpoint: str) -> Connection | None:
        """The idle connection used last, if it can carry a request (see Connection.reusable);
        never waits."""
        while True:
            stale = []
            conn = None
            with self._lock:
                idle = self._idle.get(endpoint)
                if idle:
                    since, conn = idle.pop()
                    if time.monotonic() - since > self.idle_s:  # the newest is too old: so are the rest
                        stale = [c for _, c in idle] + [conn]
                        idle.clear()
                        conn = None
            for c in stale:
                c.close()
            if conn is None or conn.reusable():
                return conn
            conn.close()

    def _connect(self, endpoint: str) -> Connection:
        url = urllib.parse.urlsplit(endpoint)
        https = url.scheme == "https"
        host, port = url.hostname or "localhost", url.port or (443 if https else 80)
        sock = socket.create_connection((host, port), timeout=self.connect_timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a request never waits for an ACK
            if https:
                if self._tls is None:
                    self._tls = ssl.create_default_context()
                sock = self._tls.wrap_socket(sock, server_hostname=host)
            sock.settimeout(self.read_timeout_s)  # connecting is quick or dead; answers may take a cold load
        except BaseException:
            sock.close()
            raise
        return Connection(sock, url.netloc.rpartition("@")[2])

    def request(
        self, method: str, endpoint: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[Connection, Answer]:
        """Send a request and read the status line and headers; the body is the caller's to read,
        then ``release`` (or close) the connection. Raises one of ``PeerError``."""
        conn = self.take_idle(endpoint)
        if conn is not None:
            try:
                return conn, conn.request(method, path, body, headers)
            except (_Unsent, _Unanswered) as exc:
                # the peer closed it as it sat idle: one more try on a new connection, unless the
                # request went out whole and the peer may have acted on it (then only if it is
                # safe to repeat); a timeout is never retried: a slow peer must not get it twice
                conn.close()
                if isinstance(exc, _Unanswered) and method not in _IDEMPOTENT:
                    raise
            except BaseException:
                conn.close()
                raise
        conn = self._connect(endpoint)
        try:
            return conn, conn.request(method, path, body, headers)
        except BaseException:
            conn.close()
            raise

    def resume(self, conn: Connection, rest: bytes, method: str) -> Answer | None:
        """The answer to a request ``Connection.send_now`` began on ``conn``, a connection this
        pool gave out; None when the peer had closed it before taking the request whole (it
        never had it: the caller sends it again, as ``request`` would, on a new connection)."""
        try:
            return conn.finish(rest, method)
        except _Unsent:
            conn.close()
            return None
        except BaseException:
            conn.close()
            raise

    def release(self, endpoint: str, conn: Connection, answer: Answer) -> None:
        """Keep the connection for the next request if its answer was read to the end and
        nothing follows it."""
        if not answer.done or answer.will_close or not conn.drained():
            conn.close()
            return
        extra = None
        with self._lock:
            idle = self._idle.setdefault(endpoint, [])
            idle.append((time.monotonic(), conn))
            if len(idle) > self.max_idle:
                extra = idle.pop(0)[1]  # the one idle longest
        if extra is not None:
            extra.close()

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for _, c in conns:
                c.close()

    def get(self, endpoint: str, path: str, headers: dict[str, str], limit: int = 16 << 20) -> tuple[int, bytes]:
        """Status and whole body of a GET; a body over ``limit`` bytes (16 MiB: a peer's health
        is a few KB) is a PeerProtocolError, not memory a broken or hostile peer fills."""
        conn, answer = self.request("GET", endpoint, path, None, headers)
        try:
            body = answer.read(limit)
        except BaseException:
            conn.close()
            raise
        self.release(endpoint, conn, answer)
        return answer.status, body

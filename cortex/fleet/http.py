"""A small keep-alive HTTP/1.1 client for talking to peer leaders (stdlib ``http.client``).

Why not a general client library: a forwarded request is on the latency path of every routed
request, and ``http.client`` costs well under half of what httpx does per request (measured: about
0.5 ms against 1.2 ms for the same call on the 2-core test box); what the fleet needs on top of it
is small: pooled connections, a connect timeout apart from the read timeout, and one retry when a
pooled connection turns out to have been closed by the peer while idle.
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.parse

PeerError = (OSError, http.client.HTTPException)  # anything a dead, closing or garbling peer raises
# what sending on a connection the peer closed while it sat idle raises: safe to send again on a new
# one (a timeout is not among them: a slow peer must not get the request twice)
_STALE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, http.client.RemoteDisconnected)


class Pool:
    """Idle keep-alive connections by endpoint, shared by every thread of the process: a request
    takes the one used last (LIFO: warm, and the least likely to have been closed by the peer
    while idle), and gives it back when its answer was read to the end.

    (It was a pool per thread: with gunicorn workers of 64-128 request threads taking requests in
    turn, every thread kept a connection of its own to each peer, and each thread's first request
    to a peer paid for a new one.)"""

    def __init__(self, connect_timeout_s: float, read_timeout_s: float, max_idle: int = 256, idle_s: float = 4.0):
        self.connect_timeout_s, self.read_timeout_s = connect_timeout_s, read_timeout_s
        # at most ``max_idle`` idle connections per endpoint; one idle longer than ``idle_s`` is not
        # reused (gunicorn, as cortex runs it, closes a keep-alive connection idle for 5 s)
        self.max_idle, self.idle_s = max_idle, idle_s
        self._idle: dict[str, list[tuple[float, http.client.HTTPConnection]]] = {}
        self._lock = threading.Lock()

    def _take(self, endpoint: str) -> http.client.HTTPConnection | None:
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
        return conn

    def _connect(self, endpoint: str) -> http.client.HTTPConnection:
        url = urllib.parse.urlsplit(endpoint)
        cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        conn = cls(url.hostname, url.port, timeout=self.connect_timeout_s)
        conn.connect()  # (http.client sets TCP_NODELAY: a request is never held back for an ACK)
        conn.sock.settimeout(self.read_timeout_s)  # connecting is quick or dead; answers may take a cold load
        return conn

    def request(
        self, method: str, endpoint: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send a request and read the status line and headers; the body is the caller's to read,
        then ``release`` (or ``discard``) the connection. Raises one of ``PeerError``."""
        conn = self._take(endpoint)
        if conn is not None:
            try:
                conn.request(method, path, body=body, headers=headers)
                return conn, conn.getresponse()
            except _STALE:
                conn.close()  # the peer closed it while it sat idle: one more try on a new one
            except BaseException:
                conn.close()
                raise
        conn = self._connect(endpoint)
        try:
            conn.request(method, path, body=body, headers=headers)
            return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise

    def release(self, endpoint: str, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        """Keep the connection for the next request if its answer was read to the end."""
        if not resp.isclosed() and not resp.chunked and resp.length == 0:
            # a Content-Length body read to its end with ``read1``, which (unlike ``read``) does not
            # mark the response done: without this every such connection was closed, not reused
            resp.close()  # (closes the response's file, not the connection's socket)
        if not (resp.isclosed() and not resp.will_close):
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

    def get(self, endpoint: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        conn, resp = self.request("GET", endpoint, path, None, headers)
        try:
            body = resp.read()
        except BaseException:
            conn.close()
            raise
        self.release(endpoint, conn, resp)
        return resp.status, body

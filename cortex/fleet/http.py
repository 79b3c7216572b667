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
import urllib.parse

PeerError = (OSError, http.client.HTTPException)  # anything a dead, closing or garbling peer raises
# what sending on a connection the peer closed while it sat idle raises: safe to send again on a new
# one (a timeout is not among them: a slow peer must not get the request twice)
_STALE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, http.client.RemoteDisconnected)


class Pool:
    """Connections by endpoint, per thread: a connection serves one request at a time, and a
    thread (a gunicorn request thread, a poller thread) runs one request at a time."""

    def __init__(self, connect_timeout_s: float, read_timeout_s: float):
        self.connect_timeout_s, self.read_timeout_s = connect_timeout_s, read_timeout_s
        self._local = threading.local()

    def _idle(self) -> dict[str, http.client.HTTPConnection]:
        idle = getattr(self._local, "idle", None)
        if idle is None:
            idle = self._local.idle = {}
        return idle

    def _connect(self, endpoint: str) -> http.client.HTTPConnection:
        url = urllib.parse.urlsplit(endpoint)
        cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        conn = cls(url.hostname, url.port, timeout=self.connect_timeout_s)
        conn.connect()
        conn.sock.settimeout(self.read_timeout_s)  # connecting is quick or dead; answers may take a cold load
        return conn

    def request(
        self, method: str, endpoint: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send a request and read the status line and headers; the body is the caller's to read,
        then ``release`` (or ``discard``) the connection. Raises one of ``PeerError``."""
        conn = self._idle().pop(endpoint, None)
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
        if resp.isclosed() and not resp.will_close:
            old = self._idle().pop(endpoint, None)
            if old is not None and old is not conn:
                old.close()
            self._idle()[endpoint] = conn
        else:
            conn.close()

    def get(self, endpoint: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        conn, resp = self.request("GET", endpoint, path, None, headers)
        try:
            body = resp.read()
        except BaseException:
            conn.close()
            raise
        self.release(endpoint, conn, resp)
        return resp.status, body

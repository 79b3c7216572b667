"""The peer client (cortex/fleet/http.py) against a real socket server that answers with fixed bytes:
every way HTTP/1.1 frames a body, interim answers, and what a garbling or vanishing peer raises."""

from __future__ import annotations

import logging
import os
import resource
import socket
import ssl
import threading
from pathlib import Path

import pytest

from cortex.fleet.http import Connection, PeerError, PeerProtocolError, Pool
from cortex.ops.logs import TextFormatter


class Canned:
    """A server that reads one request per answer and writes the next canned answer; it records what
    it received and closes after the answers marked ``close``."""

    def __init__(self, answers: list[bytes], close_after: set[int] = frozenset(), tls: ssl.SSLContext | None = None):
        self.answers, self.close_after, self.tls = answers, close_after, tls
        self.received: list[bytes] = []
        self.accepted = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        i = 0
        while i < len(self.answers):
            try:
                conn, _ = self.sock.accept()
                if self.tls is not None:
                    conn = self.tls.wrap_socket(conn, server_side=True)
            except OSError:
                return
            self.accepted += 1
            with conn:
                while i < len(self.answers):
                    data = b""
                    while b"\r\n\r\n" not in data:
                        try:
                            more = conn.recv(65536)
                        except OSError:  # the client reset it (closed with our answer unread)
                            more = b""
                        if not more:
                            break
                        data += more
                    if not data:
                        break
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = next(
                        (
                            int(ln.split(b":")[1])
                            for ln in head.split(b"\r\n")
                            if ln.lower().startswith(b"content-length")
                        ),
                        0,
                    )
                    while len(body) < length:
                        body += conn.recv(65536)
                    self.received.append(head + b"\r\n\r\n" + body)
                    try:
                        conn.sendall(self.answers[i])
                    except OSError:  # the client went away: the next answer goes on its next connection
                        break
                    i += 1
                    if i - 1 in self.close_after:
                        break

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def pool():
    p = Pool(2, 5)
    yield p
    p.close()


def test_a_request_goes_out_whole_with_host_length_and_identity_encoding(pool):
    server = Canned([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Thing: a: b\r\n\r\nok"])
    conn, answer = pool.request("POST", server.url, "/v1/x?y=1", b'{"a":1}', {"X-Cortex-Hop": "A"})
    assert answer.status == 200 and answer.header("x-thing") == "a: b" and answer.read() == b"ok" and answer.done
    pool.release(server.url, conn, answer)
    head = server.received[0].decode()
    port = server.url.rsplit(":", 1)[1]
    assert head.startswith("POST /v1/x?y=1 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{port}\r\n" in head and "X-Cortex-Hop: A\r\n" in head
    assert "Content-Length: 7\r\n" in head and "Accept-Encoding: identity\r\n" in head
    assert head.endswith('\r\n\r\n{"a":1}')
    server.close()


def test_sized_chunked_and_empty_answers_share_one_kept_connection(pool):
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n4\r\ndefg\r\n0\r\nTrailer: x\r\n\r\n"
    )
    server = Canned(
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            chunked,
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ]
    )
    assert pool.get(server.url, "/a", {}) == (200, b"hello")
    conn, answer = pool.request("GET", server.url, "/b", None, {})
    pieces = []
    while piece := answer.read1(2):  # at most what was asked for, never past a chunk
        pieces.append(piece)
    assert b"".join(pieces) == b"abcdefg" and all(len(p) <= 2 for p in pieces) and answer.done
    pool.release(server.url, conn, answer)
    assert pool.get(server.url, "/c", {}) == (204, b"")
    assert pool.get(server.url, "/d", {}) == (200, b"")  # the interim 100 is skipped
    assert server.accepted == 1
    server.close()


def test_an_answer_without_a_length_runs_to_the_close_and_its_connection_is_not_kept(pool):
    server = Canned(
        [b"HTTP/1.1 200 OK\r\n\r\nto the end", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"], close_after={0}
    )
    assert pool.get(server.url, "/", {}) == (200, b"to the end")
    assert pool.get(server.url, "/", {}) == (200, b"ok")
    assert server.accepted == 2
    server.close()


def test_connection_close_and_http_1_0_answers_are_not_kept(pool):
    server = Canned(
        [
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\na",
            b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nb",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nc",
        ],
        close_after={0, 1},
    )
    assert [pool.get(server.url, "/", {})[1] for _ in range(3)] == [b"a", b"b", b"c"]
    assert server.accepted == 3
    server.close()


def test_transfer_coding_framing_follows_rfc_9112(pool):
    server = Canned(
        [
            # chunked and a Content-Length: the chunks frame it, and the connection is not kept
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n",
            # chunked not last: the body runs to the connection's end
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n2\r\nab\r\n0\r\n\r\n",
            # repeats of one Content-Length, and a folded header line
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\nX-Long: a\r\n  b\r\n\r\nok",
        ],
        close_after={0, 1},
    )
    assert pool.get(server.url, "/", {}) == (200, b"ab")
    assert pool.get(server.url, "/", {}) == (200, b"2\r\nab\r\n0\r\n\r\n")
    conn, answer = pool.request("GET", server.url, "/", None, {})
    assert answer.read() == b"ok" and answer.header("X-Long") == "a b"
    assert server.accepted == 3  # neither of the first two connections was kept
    server.close()


def test_a_whole_body_read_stops_at_its_limit(pool):
    body = b"x" * 100_000
    server = Canned([b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + body] * 2)
    with pytest.raises(PeerProtocolError):
        pool.get(server.url, "/", {}, limit=65_536)
    assert pool.get(server.url, "/", {}, limit=100_000) == (200, body)
    assert server.accepted == 2  # the connection cut short was not kept
    server.close()


def test_bytes_left_after_an_answer_are_never_taken_for_the_next_one(pool):
    server = Canned(
        [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokSECRET", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nnew"]
    )
    assert pool.get(server.url, "/", {}) == (200, b"ok")
    assert pool.get(server.url, "/", {}) == (200, b"new")  # on a new connection
    assert server.accepted == 2
    server.close()


@pytest.mark.parametrize("method, sent_again", [("GET", True), ("POST", False)])
def test_a_request_the_peer_read_before_closing_goes_again_only_if_it_is_safe_to_repeat(pool, method, sent_again):
    # the pooled connection looks open; the peer reads the next request, then closes without a word
    server = Canned(
        [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na", b"", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"], {1}
    )
    assert pool.get(server.url, "/warm", {}) == (200, b"a")
    if sent_again:
        conn, answer = pool.request(method, server.url, "/again", None, {})
        assert answer.read() == b"b"
    else:
        with pytest.raises(PeerProtocolError):
            pool.request(method, server.url, "/once", b"{}", {})
    lines = [r.split(b"\r\n", 1)[0] for r in server.received]
    assert lines[1:] == ([b"GET /again HTTP/1.1"] * 2 if sent_again else [b"POST /once HTTP/1.1"])
    server.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"HTTP/1.1 \xb200 OK\r\n\r\n",  # digits to str.isdigit, not to int()
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n" * 17 + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # then the peer closes
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",  # then the peer closes
        b"HTTP/1.1 200 OK\r\nContent-Type: text/pl",  # the head cut short
        b"",  # closed without a word, on a fresh connection
    ],
)
def test_a_garbled_or_cut_answer_raises_a_protocol_error(pool, garbage):
    server = Canned([garbage], close_after={0})
    with pytest.raises(PeerProtocolError):
        pool.get(server.url, "/", {})
    server.close()


def test_a_peer_that_never_answers_is_a_timeout_and_a_closed_port_a_refusal():
    server = socket.create_server(("127.0.0.1", 0))  # accepts (backlog) but never answers
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    with pytest.raises(TimeoutError):
        Pool(1, 0.2).get(url, "/", {})
    server.close()
    with pytest.raises(ConnectionRefusedError):
        Pool(1, 0.2).get(url, "/", {})
    assert issubclass(TimeoutError, PeerError) and issubclass(PeerProtocolError, PeerError)


@pytest.mark.parametrize(
    "method, path, headers",
    [
        ("GET", "/", {"X-A": "a\r\nX-Injected: 1"}),
        ("GET", "/a\r\nX-Injected: 1", {}),
        ("GET", "/a b", {}),
        ("GET /x HTTP/1.1\r\n", "/", {}),
        ("GET", "/", {"X-A\r\nX-B": "1"}),
    ],
)
def test_a_request_that_would_be_two_on_the_wire_is_never_sent(pool, method, path, headers):
    server = Canned([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
    with pytest.raises(ValueError):
        pool.request(method, server.url, path, None, headers)
    assert server.received == []
    server.close()


def test_the_text_log_line_writes_each_kind_of_field_as_before():
    record = logging.LogRecord("cortex.requests", logging.INFO, __file__, 1, "request", None, None)
    record.fields = {
        "id": "chatcmpl-1",
        "model": "org/model name",
        "status": 200,
        "ok": True,
        "ttft_ms": 12.34,
        "error": None,
        "quote": 'a"b',
        "eq": "a=b",
        "empty": "",
        "tools": ["x"],
    }
    line = TextFormatter().format(record)
    assert line.endswith(
        'request id=chatcmpl-1 model="org/model name" status=200 ok=true ttft_ms=12.3 quote="a\\"b" eq="a=b"'
        ' empty="" tools=["x"]'
    )


CERT = Path(__file__).parent / "data" / "localhost-cert.pem"  # self-signed, for localhost, test-only


def test_a_tls_peers_connection_is_kept_for_the_next_request():
    """An https peer's connection is pooled like any other: TLS's "nothing to read" when it is
    given back is not taken for a broken connection."""
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(CERT, CERT.with_name("localhost-key.pem"))
    peer = Canned([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"] * 3, tls=server_tls)
    pool = Pool(2, 5, tls=ssl.create_default_context(cafile=CERT))
    endpoint = peer.url.replace("http://127.0.0.1", "https://localhost")
    assert [pool.get(endpoint, "/", {}) for _ in range(3)] == [(200, b"ok")] * 3
    assert peer.accepted == 1
    peer.close()
    pool.close()


def test_a_connection_numbered_past_1023_is_checked_as_any_other(pool):
    """select.select cannot watch descriptors past 1023; a busy front has that many."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1600:
        pytest.skip("this machine allows no descriptor past 1600")  # never so on Linux's defaults
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1600), hard))
    a, b = socket.socketpair()
    try:
        high = socket.socket(fileno=os.dup2(a.fileno(), 1500))
        assert Connection(high, "peer").reusable()  # nothing came
        b.sendall(b"x")
        assert not Connection(high, "peer").reusable()  # something came: not for a new request
        high.close()
    finally:
        a.close()
        b.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

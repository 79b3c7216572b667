"""The forwarding fast path (cortex/fleet/relay.py): what it takes, what it leaves to the ordinary
path untouched, and how it relays. Real sockets on both sides: the client's end of a socket pair,
and a peer that is a real HTTP/1.1 server on loopback. Served end to end (a gateway in front of a
real leader, through the official SDKs) in tests/test_fleet.py."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from cortex.api.auth import ApiKeys, digest, key_id
from cortex.fleet.proxy import CLIENT, FAILED_OVER, HOP, UPSTREAM, Proxy
from cortex.fleet.relay import Relay, model_of, read_plain
from cortex.fleet.routes import RouteCache
from rpc.engine import Forward, Target

CHAT = "/v1/chat/completions"
BODY = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
ANSWER = b'{"id":"chatcmpl-1","object":"chat.completion"}'


def request(
    path: str = CHAT, body: bytes = BODY, extra: str = "", method: str = "POST", version: str = "HTTP/1.1"
) -> bytes:
    head = f"{method} {path} {version}\r\nHost: gw\r\nContent-Type: application/json\r\n{extra}"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


# -- what it reads ------------------------------------------------------------------------------------


def test_a_plain_request_is_read_whole_and_the_next_one_left_alone():
    raw = request(extra="X-Request-Id: mine\r\nAuthorization: Bearer k\r\n")
    plain = read_plain(raw + request(), 1 << 20)
    assert plain is not None and plain.path == CHAT and plain.body == BODY and plain.size == len(raw)
    assert ("X-Request-Id", "mine") in plain.headers and plain.field(b"authorization") == "Bearer k"
    assert not plain.wants_close
    assert read_plain(request(extra="Connection: close\r\n"), 1 << 20).wants_close


@pytest.mark.parametrize(
    "raw",
    [
        request()[:20],  # the head has not all arrived
        request()[:-3],  # nor the body
        request(method="PUT"),
        request(version="HTTP/1.0"),
        request(path=CHAT + "?x=1"),
        request(path="/v1/chat/completions/"),
        request(path="/v1/responses"),  # the front keeps its own copy of each response
        request(path="/models/load"),
        request(extra="Transfer-Encoding: chunked\r\n"),
        request(extra="Content-Length: 3\r\n"),  # two lengths
        request(extra="Host: again\r\n"),  # any field twice
        request(extra=" folded\r\n"),  # obsolete line folding
        request(extra="X-A: one\ntwo\r\n"),  # a bare line feed
        request(extra="X-A: caf\xe9\r\n".encode("latin-1").decode("latin-1")),  # not ASCII
        request(extra="Bad Name: 1\r\n"),
        request(extra="Expect: 100-continue\r\n"),
        request(extra="Connection: upgrade\r\n"),
        request(extra=f"{HOP}: B\r\n"),  # a peer's request: served here or failed, never forwarded
        request(extra=f"{CLIENT}: key:x\r\n"),
        request(body=b"x" * 101),  # over the body limit: the ordinary path's 413
        request(extra="X_Cortex_Hop: B\r\n"),  # gunicorn drops names with "_": so does this path
        request(extra=f"X-Long: {'a' * 8190}\r\n"),  # longer than gunicorn takes: its 431
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n\r\n",  # no length
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: +5\r\n\r\n{}xxx",
        b"POST  /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
    ],
)
def test_anything_less_plain_is_declined(raw):
    assert read_plain(raw, 100) is None


@pytest.mark.parametrize(
    ("body", "model"),
    [
        (BODY, "tiny"),
        (b'{"model": 5}', None),
        (b'["tiny"]', None),
        (b"{not json", None),
        (b'{"model": "tiny", "x": ' + b"[" * 200 + b"]" * 200 + b"}", None),  # deeper than the API reads
        (b'{"model": "tiny", "messages": "\\ud800"}', None),  # a lone surrogate: the ordinary path's 400
        ('{"model": "caf\u00e9"}'.encode(), "caf\u00e9"),
    ],
)
def test_the_model_is_read_only_from_a_body_the_api_could_read(body, model):
    assert model_of(body) == model


# -- what it does with a socket --------------------------------------------------------------------------


class Peer:
    """A peer leader: an HTTP/1.1 server on loopback that records each request and answers it with
    the next of ``answers`` (raw bytes; None: read it, then close without an answer), closing the
    connection once they are all used."""

    def __init__(self, answers: list[bytes | None]):
        self.answers, self.requests = list(answers), []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                threading.Thread(target=self._serve_conn, args=(conn,), daemon=True).start()

    def _serve_conn(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            data = b""
            while self.answers:
                data += conn.recv(65536)
                head, sep, rest = data.partition(b"\r\n\r\n")
                if not sep:
                    continue
                length = int(dict(_fields(head)).get("content-length", "0"))
                if len(rest) < length:
                    continue
                self.requests.append((head.decode(), rest[:length]))
                data = rest[length:]
                answer = self.answers.pop(0)
                if answer is None:
                    return
                conn.sendall(answer)

    def close(self) -> None:
        self.sock.close()


def _fields(head: bytes) -> Iterator[tuple[str, str]]:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode().partition(":")
        yield name.lower(), value.strip()


def sized(body: bytes, status: str = "200 OK") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def chunked(events: list[bytes], end: bool = True) -> bytes:
    out = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    out += b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events)
    return out + (b"0\r\n\r\n" if end else b"")


def relay_to(targets: list[Target], keys: list[str] = (), max_body: int = 100) -> tuple[Relay, list[str]]:
    """A relay whose route cache sends ``tiny`` to ``targets``; the list fills with the endpoints
    reported to the leader as failed."""
    reported: list[str] = []
    routes = RouteCache()
    proxy = Proxy("A", lambda endpoint, why: reported.append(endpoint), 2, 10, lambda req: "", routes.forget)
    routes.learn("tiny", Forward("r", targets, "resident on B", valid_s=60), routes.epoch())
    auth = ApiKeys([digest(k) for k in keys], ["/health"])
    return Relay(proxy, routes, auth, "A", max_body), reported


def read_answer(sock: socket.socket) -> tuple[str, dict[str, str], bytes]:
    """One whole HTTP/1.1 answer: status line, fields by lower-case name, body (unchunked)."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n")[0].decode()
    fields = dict(_fields(head))
    if "content-length" in fields:
        while len(rest) < int(fields["content-length"]):
            rest += sock.recv(65536)
        return status, fields, rest
    while not rest.endswith(b"0\r\n\r\n"):
        rest += sock.recv(65536)
    body = b""
    while True:
        size, _, rest = rest.partition(b"\r\n")
        if int(size, 16) == 0:
            return status, fields, body
        body, rest = body + rest[: int(size, 16)], rest[int(size, 16) + 2 :]


@pytest.fixture
def pair():
    client, server = socket.socketpair()
    yield client, server
    client.close()
    server.close()


def test_a_request_the_route_cache_sends_on_is_relayed_with_the_fleets_headers(pair):
    client, server = pair
    peer = Peer([sized(ANSWER)])
    relay, _ = relay_to([Target("B", peer.url, key="fleet-secret")], keys=["k"])
    client.sendall(request(extra="Authorization: Bearer k\r\nX-Request-Id: mine\r\n"))
    assert relay.take(server, "10.0.0.7", True) is True
    status, fields, body = read_answer(client)
    assert status == "HTTP/1.1 200 OK" and body == ANSWER
    assert fields["request-id"] == fields["x-request-id"] == "mine" and fields[UPSTREAM.lower()] == "B"
    assert "connection" not in fields
    head, sent = peer.requests[0]
    assert head.startswith(f"POST {CHAT} HTTP/1.1") and sent == BODY
    got = dict(_fields(head.encode()))
    assert got["authorization"] == "Bearer fleet-secret"  # the fleet's credential, never the client's
    assert got[HOP.lower()] == "A" and got[CLIENT.lower()] == key_id("k")
    peer.close()


def test_a_request_over_64_kib_goes_the_ordinary_way(pair):
    """The fast path's first half runs on the worker's main thread: it peeks at 64 KiB at most."""
    client, server = pair
    relay, _ = relay_to([Target("B", "http://127.0.0.1:9")], max_body=1 << 20)
    raw = request(body=json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 70_000}]}).encode())
    threading.Thread(target=client.sendall, args=(raw,), daemon=True).start()
    deadline = time.monotonic() + 10
    while len(server.recv(1 << 20, socket.MSG_PEEK)) < len(raw) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert relay.take(server, "10.0.0.7", True) is None
    assert server.recv(1 << 20, socket.MSG_PEEK) == raw


def _arrived(peer: Peer, n: int) -> bool:
    deadline = time.monotonic() + 10
    while len(peer.requests) < n and time.monotonic() < deadline:
        time.sleep(0.005)
    return len(peer.requests) >= n


def test_the_request_is_on_its_way_to_the_peer_before_a_request_thread_takes_over(pair):
    """``begin`` (the main thread) writes it to an idle pooled connection; ``finish`` relays."""
    client, server = pair
    peer = Peer([sized(ANSWER), sized(ANSWER)])
    relay, _ = relay_to([Target("B", peer.url)])
    client.sendall(request())
    assert relay.take(server, "10.0.0.7", True) is True and read_answer(client)[2] == ANSWER  # pools it
    client.sendall(request(extra="X-Request-Id: second\r\n"))
    job = relay.begin(server, "10.0.0.7", True)
    assert job is not None and job.early is not None and _arrived(peer, 2)
    assert relay.finish(server, job) is True
    _, fields, body = read_answer(client)
    assert body == ANSWER and fields["request-id"] == "second"
    peer.close()


def test_a_request_begun_on_a_connection_the_peer_then_drops_fails_over(pair):
    client, server = pair
    dropping = Peer([sized(ANSWER), None])  # answers one request, then closes on the next
    good = Peer([sized(ANSWER)])
    relay, reported = relay_to([Target("B", dropping.url), Target("C", good.url)])
    client.sendall(request())
    assert relay.take(server, "10.0.0.7", True) is True and read_answer(client)[2] == ANSWER
    client.sendall(request())
    job = relay.begin(server, "10.0.0.7", True)
    assert job is not None and job.early is not None and _arrived(dropping, 2)
    assert relay.finish(server, job) is True
    _, fields, body = read_answer(client)
    assert body == ANSWER and fields[UPSTREAM.lower()] == "C" and fields[FAILED_OVER.lower()] == "B"
    assert reported == [dropping.url]
    dropping.close()
    good.close()


class ClosingIdle(Peer):
    """A peer whose first connection answers one request, then closes as if idle too long while
    the next request is still coming (small buffers: it arrives in pieces); later ones answer."""

    def __init__(self):
        super().__init__([sized(ANSWER)] * 3)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.connections = 0

    def _serve_conn(self, conn: socket.socket) -> None:
        self.connections += 1
        if self.connections > 1:
            return super()._serve_conn(conn)
        with conn, contextlib.suppress(OSError):
            data = b""
            while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < len(BODY):
                data += conn.recv(65536)
            conn.sendall(self.answers.pop(0))
            time.sleep(0.3)  # the next request starts arriving; then the idle close, unread


def test_a_request_begun_on_a_connection_the_peer_closes_idle_goes_again_on_a_new_one(pair):
    """As the ordinary path's pool does: the peer never had it whole, so it is not a failure."""
    client, server = pair
    peer = ClosingIdle()
    relay, reported = relay_to([Target("B", peer.url)], max_body=1 << 16)
    client.sendall(request())
    assert relay.take(server, "10.0.0.7", True) is True and read_answer(client)[2] == ANSWER
    pooled = relay.proxy.pool._idle[peer.url][-1][1]  # small buffers: the request goes in pieces
    pooled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 62_000}]}).encode()
    client.sendall(request(body=body))
    job = relay.begin(server, "10.0.0.7", True)
    assert job is not None and job.early is not None and job.early.rest  # begun, not all written
    assert relay.finish(server, job) is True
    assert read_answer(client)[2] == ANSWER and reported == [] and peer.connections == 2
    assert peer.requests[-1][1] == body
    peer.close()


def test_with_no_request_thread_free_the_request_waits_unsent(pair):
    client, server = pair
    peer = Peer([sized(ANSWER), sized(ANSWER)])
    relay, _ = relay_to([Target("B", peer.url)])
    client.sendall(request())
    assert relay.take(server, "10.0.0.7", True) is True and read_answer(client)[2] == ANSWER
    client.sendall(request())
    job = relay.begin(server, "10.0.0.7", True, may_start=False)
    assert job is not None and job.early is None
    time.sleep(0.1)
    assert len(peer.requests) == 1  # nothing sent yet: a peer must not generate for nobody
    assert relay.finish(server, job) is True and read_answer(client)[2] == ANSWER
    peer.close()


def test_a_target_that_knows_the_model_by_another_name_is_not_begun_early(pair):
    """Renaming the model parses and rewrites the body: not on the main thread."""
    client, server = pair
    peer = Peer([sized(ANSWER), sized(ANSWER)])
    relay, _ = relay_to([Target("B", peer.url, model="tiny-q8")])
    client.sendall(request())
    assert relay.take(server, "10.0.0.7", True) is True and read_answer(client)[2] == ANSWER
    client.sendall(request())
    job = relay.begin(server, "10.0.0.7", True)
    assert job is not None and job.early is None
    assert relay.finish(server, job) is True and read_answer(client)[2] == ANSWER
    assert json.loads(peer.requests[-1][1])["model"] == "tiny-q8"
    peer.close()


def test_the_peers_request_ids_give_way_to_this_nodes(pair):
    client, server = pair
    answer = sized(ANSWER).replace(b"\r\n\r\n", b"\r\nrequest-id: req_peer\r\nX-Request-Id: req_peer\r\n\r\n", 1)
    peer = Peer([answer])
    relay, _ = relay_to([Target("B", peer.url)])
    client.sendall(request(extra="X-Request-Id: mine\r\n"))
    assert relay.take(server, "10.0.0.7", True) is True
    client.settimeout(10)
    head = client.recv(65536).partition(b"\r\n\r\n")[0].lower()
    assert head.count(b"request-id: ") == 2 and b"req_peer" not in head
    assert b"\r\nrequest-id: mine" in head and b"\r\nx-request-id: mine" in head
    peer.close()


def test_a_stream_is_relayed_chunk_by_chunk_and_the_connection_goes_on(pair):
    client, server = pair
    events = [b'data: {"n":1}\n\n', b'data: {"n":2}\n\n', b"data: [DONE]\n\n"]
    peer = Peer([chunked(events)])
    relay, _ = relay_to([Target("B", peer.url)])
    client.sendall(request() + request())  # the next request waits, unread
    assert relay.take(server, "10.0.0.7", True) is True
    status, fields, body = read_answer(client)
    assert fields["transfer-encoding"] == "chunked" and body == b"".join(events)
    assert fields["content-type"] == "text/event-stream"
    assert fields["x-request-id"].startswith("req_")
    assert server.recv(65536, socket.MSG_PEEK) == request()
    peer.close()


@pytest.mark.parametrize(("path", "dialect"), [(CHAT, "openai"), ("/v1/messages", "anthropic")])
def test_a_stream_the_peer_cuts_ends_with_the_dialects_error_event(pair, path, dialect):
    client, server = pair
    peer = Peer([chunked([b'data: {"n":1}\n\n'], end=False)])  # then it closes the connection
    relay, reported = relay_to([Target("B", peer.url)])
    client.sendall(request(path))
    assert relay.take(server, "10.0.0.7", True) is True  # the chunked body still ends properly
    _, _, body = read_answer(client)
    last = body.split(b"\n\n")[-2]
    if dialect == "anthropic":
        event, data = last.split(b"\n")
        assert event == b"event: error" and json.loads(data.removeprefix(b"data: "))["error"]["type"] == "api_error"
    else:
        assert json.loads(last.removeprefix(b"data: "))["error"]["code"] == "upstream_failed"
    assert reported == [peer.url]
    peer.close()


def test_no_peer_answering_is_a_503_in_the_callers_dialect_after_trying_each(pair):
    client, server = pair
    dead = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    urls = [f"http://127.0.0.1:{s.getsockname()[1]}" for s in dead]
    for s in dead:
        s.close()
    relay, reported = relay_to([Target("B", urls[0]), Target("C", urls[1])])
    client.sendall(request("/v1/messages", extra="Connection: close\r\n"))
    assert relay.take(server, "10.0.0.7", True) is False  # the client asked to close
    status, fields, body = read_answer(client)
    assert status.startswith("HTTP/1.1 503") and fields["retry-after"] == "2" and fields["connection"] == "close"
    assert json.loads(body)["error"]["type"] == "overloaded_error"  # Anthropic's name for a 503
    assert "B, C" in json.loads(body)["error"]["message"] and reported == urls


def test_a_refusing_peer_fails_over_to_the_next(pair):
    client, server = pair
    refusing = Peer([sized(b'{"error":{}}', "500 Internal Server Error")])
    good = Peer([sized(ANSWER)])
    relay, reported = relay_to([Target("B", refusing.url), Target("C", good.url)])
    client.sendall(request())
    assert relay.take(server, "10.0.0.7", True) is True
    _, fields, body = read_answer(client)
    assert body == ANSWER and fields[UPSTREAM.lower()] == "C" and fields[FAILED_OVER.lower()] == "B"
    assert reported == [refusing.url]
    refusing.close()
    good.close()


@pytest.mark.parametrize(
    "answer",
    [sized(ANSWER)[:-5], chunked([ANSWER], end=False).replace(b"text/event-stream", b"application/json")],
    ids=["sized", "chunked"],
)
def test_an_answer_cut_short_closes_the_clients_connection(pair, answer):
    client, server = pair
    peer = Peer([answer])  # then it closes the connection
    relay, _ = relay_to([Target("B", peer.url)])
    client.sendall(request())
    assert relay.take(server, "10.0.0.7", True) is False  # only closing tells the client it is short
    client.settimeout(10)
    got = b""
    while ANSWER[:-5] not in got:
        got += client.recv(65536)
    assert not got.endswith(b"0\r\n\r\n")  # no end marker for what did not end
    peer.close()


def test_a_request_taken_always_gets_an_answer(pair, monkeypatch):
    client, server = pair
    relay, _ = relay_to([Target("B", "http://127.0.0.1:9")])

    def broken(*args, **kwargs):
        raise RuntimeError("a defect")

    monkeypatch.setattr(relay.proxy, "open", broken)
    client.sendall(request("/v1/messages"))
    assert relay.take(server, "10.0.0.7", True) is True
    status, _, body = read_answer(client)
    assert status.startswith("HTTP/1.1 500") and json.loads(body)["type"] == "error"


def test_a_body_naming_no_cached_model_is_not_parsed(pair, monkeypatch):
    client, server = pair
    relay, _ = relay_to([Target("B", "http://127.0.0.1:9")])
    parsed = []
    monkeypatch.setattr("cortex.fleet.relay.model_of", lambda body: parsed.append(body))
    raw = request(body=json.dumps({"model": "local-one", "messages": []}).encode())
    client.sendall(raw)
    assert relay.take(server, "10.0.0.7", True) is None and parsed == []
    assert server.recv(65536, socket.MSG_PEEK) == raw


def test_a_request_whose_early_start_fails_is_still_answered(pair, monkeypatch):
    client, server = pair
    peer = Peer([sized(ANSWER)])
    relay, _ = relay_to([Target("B", peer.url)])

    def broken(*args, **kwargs):
        raise RuntimeError("a defect")

    monkeypatch.setattr(relay.proxy, "start", broken)
    client.sendall(request())
    job = relay.begin(server, "10.0.0.7", True)
    assert job is not None and job.early is None  # taken, then started afresh by the request thread
    assert relay.finish(server, job) is True and read_answer(client)[2] == ANSWER
    peer.close()


def test_with_nothing_forwarded_lately_nothing_is_read(pair):
    client, server = pair
    relay = Relay(Proxy("A", print, 2, 10, str, print), RouteCache(), ApiKeys([], []), "A", 100)
    client.sendall(request())
    assert relay.take(server, "10.0.0.7", True) is None
    assert server.recv(65536, socket.MSG_PEEK) == request()


@pytest.mark.parametrize(
    ("raw", "keys"),
    [
        (request(), ["k"]),  # no key where keys are on: the ordinary path's 401
        (request(extra="Authorization: Bearer wrong\r\n"), ["k"]),
        (request(body=json.dumps({"model": "other"}).encode()), []),  # no route cached for it
        (request(body=b"{broken"), []),  # the ordinary path's 400
        (request(body=b"x" * 101), []),
        (request()[:-4], []),  # not all there yet
    ],
    ids=["no-key", "wrong-key", "uncached-model", "bad-json", "too-large", "partial"],
)
def test_what_it_declines_is_left_unread_for_the_ordinary_path(pair, raw, keys):
    client, server = pair
    relay, _ = relay_to([Target("B", "http://127.0.0.1:9")], keys=keys)
    client.sendall(raw)
    assert relay.take(server, "10.0.0.7", True) is None
    assert server.recv(65536, socket.MSG_PEEK) == raw

"""The front's copies of its leader's routing answers (cortex/fleet/routes.py), the leader's part
(``Forward.valid_s``, cortex/fleet/fleet.py) and the engine client's (cortex/api/engine_client.py),
the latter against a scripted leader: a real ZeroMQ socket that answers every Submit with a Forward.

Requests for a model another leader serves ask the leader once per ``valid_s``, not once each; a
request a peer forwarded always asks; a target that fails or refuses (a 503 before any byte) drops
every copy naming it, so the next request asks the leader again. (That a model becoming resident
here is served here once the bound has passed, with real leaders: tests/test_fleet.py.)
"""

from __future__ import annotations

import socket
import threading

import falcon
import falcon.testing
import pytest

from cortex.api.engine_client import EngineClient
from cortex.config import ConfigError, load
from cortex.fleet.fleet import Fleet
from cortex.fleet.peers import PeerSnapshot
from cortex.fleet.proxy import FAILED_OVER, ForwardTo, Proxy
from cortex.fleet.routes import RouteCache
from rpc.engine import Forward, Submit, Target
from rpc.messages import SamplingParams
from tests.test_engine_client import ScriptedLeader

B = Target("B", "http://b:1")
C = Target("C", "http://c:1")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _forward(rid: str = "r", targets=(B, C), valid_s: float = 0.5) -> Forward:
    return Forward(rid, list(targets), "resident on B", valid_s)


# -- the cache ---------------------------------------------------------------------------------------


def test_an_answer_is_reused_for_its_model_until_it_expires():
    clock = Clock()
    routes = RouteCache(clock=clock)
    routes.learn("tiny", _forward(), routes.epoch())
    hit = routes.lookup("tiny", "r2")
    assert hit is not None and hit.request_id == "r2" and [t.node for t in hit.targets] == ["B", "C"]
    assert routes.lookup("other", "r3") is None
    clock.now += 0.49
    assert routes.lookup("tiny", "r4") is not None
    clock.now += 0.02
    assert routes.lookup("tiny", "r5") is None and len(routes) == 0


def test_an_answer_the_leader_says_not_to_reuse_is_not_kept():
    routes = RouteCache()
    routes.learn("cold", _forward(valid_s=0), routes.epoch())
    assert routes.lookup("cold", "r") is None


def test_a_failed_target_drops_every_answer_naming_it_and_answers_asked_for_before():
    routes = RouteCache()
    routes.learn("tiny", _forward(targets=(B, C)), routes.epoch())
    routes.learn("solo", _forward(targets=(C,)), routes.epoch())
    asked_before = routes.epoch()
    routes.forget(B.endpoint)
    assert routes.lookup("tiny", "r") is None and routes.lookup("solo", "r") is not None
    routes.learn("tiny", _forward(targets=(B, C)), asked_before)  # the leader may not have heard yet
    assert routes.lookup("tiny", "r") is None


def test_the_cache_is_bounded():
    clock = Clock()
    routes = RouteCache(max_entries=2, clock=clock)
    routes.learn("a", _forward(valid_s=1), routes.epoch())
    routes.learn("b", _forward(valid_s=5), routes.epoch())
    routes.learn("c", _forward(valid_s=5), routes.epoch())  # full: the oldest goes
    assert len(routes) == 2 and routes.lookup("a", "r") is None
    clock.now += 2
    routes.learn("d", _forward(valid_s=5), routes.epoch())
    assert len(routes) == 2 and routes.lookup("b", "r") is None and routes.lookup("d", "r") is not None


# -- the leader's side -------------------------------------------------------------------------------


def _config(tmp_path, gateway: str = ""):
    (tmp_path / "cortex.toml").write_text(
        f'[node]\nname = "A"\ndevices = []\n[gateway]\n{gateway}[[peers]]\nname = "B"\nendpoint = "http://127.0.0.1:9"\n'
    )
    return load(tmp_path / "cortex.toml")


def test_how_long_an_answer_holds_is_the_gateways_route_cache_s(tmp_path):
    assert _config(tmp_path).gateway.route_cache_s == 0.5
    assert _config(tmp_path, "route_cache_s = 0\n").gateway.route_cache_s == 0
    with pytest.raises(ConfigError, match="route_cache_s: expected a number >= 0, got -0.5"):
        _config(tmp_path, "route_cache_s = -0.5\n")


def _health(models: dict[str, str], free: int = 1 << 30) -> dict:
    return {
        "status": "ok",
        "devices": [{"device": "cpu", "free_bytes": free, "evictable_bytes": 0}],
        "models": [{"id": m, "status": s, "size_bytes": 1 << 20} for m, s in models.items()],
    }


def test_only_an_answer_to_a_resident_model_may_be_reused(tmp_path, monkeypatch):
    fleet = Fleet(_config(tmp_path, "route_cache_s = 0.3\n"))
    health = _health({"tiny": "loaded", "cold": "unloaded"})
    peer = PeerSnapshot("B", "http://127.0.0.1:9", "", True, False, health, "", 1.0)
    monkeypatch.setattr(fleet.peers, "snapshot", lambda: [peer])
    resident = fleet.decide("r1", "tiny", _health({}))
    cold = fleet.decide("r2", "cold", _health({}))
    assert isinstance(resident, Forward) and resident.valid_s == 0.3
    assert isinstance(cold, Forward) and cold.valid_s == 0
    assert [t.node for t in resident.targets] == ["B"] and [t.node for t in cold.targets] == ["B"]


# -- the engine client against a leader --------------------------------------------------------------


def _submit(rid: str, model: str = "tiny", hop: bool = False) -> Submit:
    return Submit(rid, model, [{"role": "user", "content": "hi"}], SamplingParams(), hop=hop)


def _forwarded(client: EngineClient, req: Submit) -> Forward:
    with pytest.raises(ForwardTo) as raised:
        client.submit(req)
    assert raised.value.forward.request_id == req.request_id
    return raised.value.forward


@pytest.fixture
def endpoint(tmp_path):
    return f"ipc://{tmp_path}/engine.sock"


def _leader(endpoint: str, valid_s: float) -> ScriptedLeader:
    return ScriptedLeader(endpoint, lambda m: [_forward(m.request_id, valid_s=valid_s)])


def _questions(leader: ScriptedLeader) -> int:
    return sum(isinstance(m, Submit) for m in leader.received)


def test_repeated_requests_for_a_peers_model_ask_the_leader_once(endpoint):
    leader = _leader(endpoint, valid_s=60)
    client = EngineClient(endpoint, event_timeout_s=5)
    try:
        for i in range(20):
            assert [t.node for t in _forwarded(client, _submit(f"r{i}")).targets] == ["B", "C"]
        assert _questions(leader) == 1
        _forwarded(client, _submit("other", model="solo"))  # another name: its own question
        assert _questions(leader) == 2
        for i in range(3):
            _forwarded(client, _submit(f"hop{i}", hop=True))  # a forwarded request: always the leader's call
        assert _questions(leader) == 5
    finally:
        client.close()
        leader.stop()


def test_without_reuse_every_request_asks_the_leader(endpoint):
    leader = _leader(endpoint, valid_s=0)
    client = EngineClient(endpoint, event_timeout_s=5)
    try:
        for i in range(5):
            _forwarded(client, _submit(f"r{i}"))
        assert _questions(leader) == 5
    finally:
        client.close()
        leader.stop()


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once it is closed


def _answering(answer: bytes) -> str:
    """An HTTP server that answers every request with ``answer`` and closes the connection."""
    sock = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            conn, _ = sock.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("failure", ["unreachable", "busy"])
def test_a_target_that_fails_or_refuses_sends_the_next_request_to_the_leader(endpoint, failure):
    """The proxy fails over, and drops this front's copies naming the first target; only one that
    is broken (not a 503: busy or loading) is reported to the leader."""
    ok = _answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    first = (
        _closed_port() if failure == "unreachable" else _answering(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")
    )
    targets = [Target("B", first), Target("C", ok)]
    leader = ScriptedLeader(endpoint, lambda m: [Forward(m.request_id, targets, "resident on B", 60)])
    client = EngineClient(endpoint, event_timeout_s=5)
    reported: list[str] = []
    proxy = Proxy("A", lambda e, why: reported.append(e), 2, 10, lambda req: "", client.routes.forget)
    try:
        _forwarded(client, _submit("r1"))
        forward = _forwarded(client, _submit("r2"))
        assert _questions(leader) == 1
        req = falcon.testing.create_req(method="POST", path="/v1/chat/completions", body=b"{}")
        req.context.raw_body = b"{}"
        resp = falcon.Response()
        proxy.handle(req, resp, ForwardTo(forward), {})
        assert resp.status_code == 200 and resp.get_header(FAILED_OVER) == "B"
        assert b"".join(resp.stream) == b"ok"
        assert reported == ([first] if failure == "unreachable" else [])
        _forwarded(client, _submit("r3"))
        assert _questions(leader) == 2
    finally:
        proxy.pool.close()
        client.close()
        leader.stop()

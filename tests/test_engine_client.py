"""The front's engine client (cortex/api/engine_client.py) against a scripted leader: a real ZeroMQ
ROUTER socket in a thread that answers as the leader would.

A front thread reuses its socket for the next request once an exchange ended cleanly (no ZeroMQ
handshake per request); a request left mid-way is cancelled and its socket closed; a late event of
an earlier request on a reused socket never reaches the next one.
"""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from cortex.api.engine_client import EngineClient
from rpc.codec import decode, encode
from rpc.engine import Answer, Cancel, Delta, Finished, Query, Started, Submit
from rpc.messages import SamplingParams


class ScriptedLeader:
    """Answers each Query with the identity that asked, and each Submit with ``script(submit)``."""

    def __init__(self, endpoint: str, script):
        self.ctx = zmq.Context()
        self.socket = self.ctx.socket(zmq.ROUTER)
        self.socket.bind(endpoint)
        self.script, self.received, self.identities = script, [], []
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            if not self.socket.poll(50):
                continue
            peer, payload = self.socket.recv_multipart()
            msg = decode(payload)[1]
            self.received.append(msg)
            self.identities.append(peer)
            answer = [Answer({"peer": peer.hex()})]
            replies = {Query: lambda m, a=answer: a, Submit: self.script}.get(type(msg))
            for reply in replies(msg) if replies else []:
                self.socket.send_multipart([peer, encode(reply, 0)])

    def stop(self) -> None:
        self.running = False
        self.thread.join()
        self.socket.close(linger=0)
        self.ctx.term()


def _submit(rid: str) -> Submit:
    return Submit(rid, "m", [{"role": "user", "content": "hi"}], SamplingParams())


def _whole(rid: str) -> list:
    return [Started(rid, 3), Delta(rid, "ok", 1), Finished(rid, "length", 3, 1)]


@pytest.fixture
def endpoint(tmp_path):
    return f"ipc://{tmp_path}/engine.sock"


def test_a_thread_reuses_its_socket_after_clean_exchanges(endpoint):
    leader = ScriptedLeader(endpoint, lambda m: _whole(m.request_id))
    try:
        client = EngineClient(endpoint, event_timeout_s=5)
        first, second = client.query("health"), client.query("health")
        assert first == second  # the same DEALER identity: one connection, no new handshake
        for rid in ("r1", "r2"):
            gen = client.submit(_submit(rid))
            assert [type(e).__name__ for e in gen.events()] == ["Delta", "Finished"]
        assert len(set(leader.identities)) == 1
        other: list = []
        t = threading.Thread(target=lambda: other.append(client.query("health")))
        t.start()
        t.join()
        assert other[0] != first  # another thread: its own socket
    finally:
        leader.stop()


def test_a_request_left_mid_way_is_cancelled_and_its_socket_not_reused(endpoint):
    leader = ScriptedLeader(endpoint, lambda m: [Started(m.request_id, 3), Delta(m.request_id, "a", 1)])
    try:
        client = EngineClient(endpoint, event_timeout_s=5)
        gen = client.submit(_submit("r1"))
        events = gen.events()
        assert isinstance(next(events), Delta)
        events.close()  # the HTTP client went away
        after = client.query("health")["peer"]
        assert after != leader.identities[0].hex()  # a new socket: the old one may still get r1's events
        deadline = time.monotonic() + 5
        while not any(isinstance(m, Cancel) and m.request_id == "r1" for m in leader.received):
            assert time.monotonic() < deadline, "no Cancel reached the leader"
            time.sleep(0.01)
    finally:
        leader.stop()


def test_a_late_event_of_an_earlier_request_never_reaches_the_next_one(endpoint):
    def script(m):  # the leader still had a Delta of r1 in flight when r2 came on the same socket
        return [Delta("r1", "stale", 9), *_whole(m.request_id)] if m.request_id == "r2" else _whole(m.request_id)

    leader = ScriptedLeader(endpoint, script)
    try:
        client = EngineClient(endpoint, event_timeout_s=5)
        assert len(list(client.submit(_submit("r1")).events())) == 2
        got = list(client.submit(_submit("r2")).events())
        assert [(type(e).__name__, e.request_id) for e in got] == [("Delta", "r2"), ("Finished", "r2")]
        assert got[0].text == "ok" and len(set(leader.identities)) == 1
    finally:
        leader.stop()

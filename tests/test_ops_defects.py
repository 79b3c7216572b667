"""Operational defects (issue 20), each shown on real processes and sockets first:

1. socket files: every one is 0600 while the node runs, and none is left after a clean stop;
2. a pure gateway (`devices = []`) starts with no models.toml and routes to its peers;
3. the KV cache and batch gauges are those of the moment a scrape comes, not of a snapshot;
4. a stream whose leader dies ends with its dialect's error event, at once;
5. what gunicorn refuses itself (431, a bad request line, a bad header) is answered in JSON.

One `cortex serve` (module scope, node "B") runs through the tests in file order; the last one
stops it. The leader-death test kills a server of its own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import zmq

from cortex.api.engine_client import EngineClient
from cortex.api.errors import ApiError
from rpc.codec import decode, encode
from rpc.engine import Delta, Started, Submit
from rpc.messages import SamplingParams
from rpc.transport import RpcClient, RpcServer
from tests.conftest import STOP_WAIT_S, Server, free_port, scrape, tiny_models_toml, value, wait_for

HI = [{"role": "user", "content": "Hello, world! How are you today?"}]


@pytest.fixture(scope="module")
def node(tmp_path_factory, tiny_qwen3):
    root = tmp_path_factory.mktemp("ops-defects")
    # 10 ms per step: a 120-token stream is still running when the test looks at the gauges
    srv = Server(
        root, tiny_models_toml(tiny_qwen3, "max_context = 1024"), name="B", env={"CORTEX_TEST_STEP_DELAY_S": "0.01"}
    )
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


def _sockets(run_dir: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in run_dir.glob("*.sock")}


# -- 1. socket files ------------------------------------------------------------------------------------


def test_every_socket_file_is_the_users_alone(node):
    found = _sockets(node.root / "run")
    assert {"engine.sock", "admin.sock", "worker-0.sock"} <= set(found), found
    assert {name: mode for name, mode in found.items() if mode != 0o600} == {}


def test_rpc_server_socket_files_default_to_0600_and_go_with_the_server(tmp_path):
    path = tmp_path / "x.sock"
    server = RpcServer(f"ipc://{path}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    server.close()
    assert not path.exists()
    # a server that closes late never removes the file of the one that bound the path since
    old = RpcServer(f"ipc://{path}")
    new = RpcServer(f"ipc://{path}")  # unlinks the old file and binds a new one (a restarted worker)
    old.close()
    assert path.exists()
    client = RpcClient(f"ipc://{path}")
    try:
        client.send(Started("r", 1))
        assert new.recv(5000) is not None
    finally:
        client.close()
        new.close()
    assert not path.exists()


def test_a_worker_stopped_with_sigterm_removes_its_socket_file(tmp_path):
    """The worker process never closes its server: it exits through SIGTERM's sys.exit."""
    path = tmp_path / "worker-9.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.worker", "--endpoint", f"ipc://{path}", "--device", "cpu"],
        stdin=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        wait_for(path.exists, what="the worker's socket file")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        proc.terminate()
        assert proc.wait(STOP_WAIT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not path.exists()


# -- 5. gunicorn's own errors -----------------------------------------------------------------------------


def _raw(srv: Server, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as is; return the status, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def test_an_oversize_header_is_a_431_in_json(node):
    status, headers, body = _raw(node, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    assert status == 431
    assert headers["content-type"] == "application/json"
    err = json.loads(body)["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "request_header_fields_too_large"
    assert err["message"]


def test_a_bad_request_line_is_a_400_in_json(node):
    status, headers, body = _raw(node, b"THIS IS NOT HTTP\r\n\r\n")
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["type"] == "invalid_request_error"


def test_a_bad_header_on_the_messages_path_answers_in_anthropics_envelope(node):
    request = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: twelve\r\n\r\n"
    status, headers, body = _raw(node, request)
    assert status == 400 and headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error", doc
    status, _, body = _raw(node, request.replace(b"/v1/messages", b"/v1/chat/completions"))
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"


# -- 3. gauges of the moment --------------------------------------------------------------------------------


def test_kv_and_batch_gauges_are_current_at_each_scrape(node):
    """Scraped right after the first tokens, a stream is in the batch and holds KV blocks; scraped
    right after its end, it is gone and so are its blocks. No waiting: a scrape reads the state of
    its moment (before the fix, gauges were up to a refresh period and a loop turn old)."""
    body = {"model": "tiny", "messages": HI, "max_tokens": 120, "stream": True, "ignore_eos": True}
    for _ in range(4):
        with httpx.stream("POST", node.url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            seen = 0
            for line in lines:
                seen += line.startswith("data: ")
                if seen == 5:
                    break
            during = scrape(node.metrics_url)
            rest = [ln for ln in lines if ln]
        assert rest[-1] == "data: [DONE]"
        after = scrape(node.metrics_url)
        assert value(during, "cortex_running_sequences", model="tiny") == 1
        assert value(during, "cortex_kv_cache_blocks", model="tiny", state="used") > 0
        assert value(during, "cortex_kv_cache_usage_ratio", model="tiny") > 0
        assert value(after, "cortex_running_sequences", model="tiny") == 0
        assert value(after, "cortex_kv_cache_blocks", model="tiny", state="used") == 0
        assert value(after, "cortex_kv_cache_usage_ratio", model="tiny") == 0


def test_a_scrape_waits_for_no_loop_that_is_not_turning():
    """Without a leader loop (or once it has stopped) a scrape serves the last gauges at once."""
    from cortex.ops.metrics import ScrapeSync

    sync = ScrapeSync()
    t0 = time.monotonic()
    assert sync.ask(30) is False
    assert time.monotonic() - t0 < 10  # not the 30 s it would wait for a turning loop
    sync.turned_at = time.monotonic()
    done = threading.Event()

    def loop() -> None:  # what EngineMetrics.refresh does once a turn
        while not done.is_set():
            sync.answered(sync.asked)
            time.sleep(0.01)

    turning = threading.Thread(target=loop)
    turning.start()
    try:
        assert sync.ask(30) is True
    finally:
        done.set()
        turning.join()


# -- 2. a pure gateway with no catalogue ---------------------------------------------------------------------


class Gateway(Server):
    """`cortex serve` with `devices = []`, its peers, and no models.toml at all."""

    def __init__(self, root: Path, peers: str):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{free_port()}/metrics"
        (root / "run").mkdir(parents=True, exist_ok=True)
        (root / "cortex.toml").write_text(
            f'[node]\nname = "G"\ndevices = []\nrun_dir = "{root / "run"}"\n'
            f'[gateway]\nlisten = "127.0.0.1:{self.port}"\nworkers = 1\nthreads = 4\n'
            f'metrics_listen = "{self.metrics_url[len("http://") : -len("/metrics")]}"\n'
            f"[fleet]\npoll_interval_s = 0.3\n{peers}"
        )
        assert not (root / "models.toml").exists()
        self.log = open(root / "serve.log", "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cortex.cli", "serve", "--config", str(root / "cortex.toml")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )


def test_a_pure_gateway_starts_without_a_models_file_and_routes_to_its_peers(node, tmp_path):
    gw = Gateway(tmp_path, f'[[peers]]\nname = "B"\nendpoint = "{node.url}"\n')
    try:
        gw.wait_http()

        def listed() -> bool:
            data = httpx.get(gw.url + "/v1/models", timeout=30).json()["data"]
            return any(m["id"] == "tiny" and m["resident_on"] == ["B"] for m in data)

        wait_for(listed, what="the gateway to list its peer's model")
        r = httpx.post(
            gw.url + "/v1/chat/completions", json={"model": "tiny", "messages": HI, "max_tokens": 4}, timeout=60
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-cortex-upstream"] == "B"
        a = httpx.post(gw.url + "/v1/messages", json={"model": "small", "messages": HI, "max_tokens": 4}, timeout=60)
        assert a.status_code == 200 and a.json()["type"] == "message", a.text
        assert httpx.post(gw.url + "/v1/chat/completions", json={"model": "nope", "messages": HI}).status_code == 404
    finally:
        gw.stop()
    assert gw.proc.returncode == 0, gw.logs()
    assert _sockets(tmp_path / "run") == {}


# -- 1, at the end: a clean stop ------------------------------------------------------------------------------


def test_a_clean_stop_leaves_no_socket_files(node):
    run = node.root / "run"
    assert "worker-0.sock" in _sockets(run)
    node.stop()
    assert node.proc.returncode == 0
    assert _sockets(run) == {}, node.logs()


# -- 4. the leader dies mid-stream ----------------------------------------------------------------------------


def _stream(srv: Server, path: str, body: dict, started: threading.Event, out: dict) -> None:
    lines: list[str] = []
    try:
        with httpx.stream("POST", srv.url + path, json=body, timeout=60) as r:
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("data: "):
                    started.set()
                if line.startswith(('data: {"error"', "event: error")):
                    out["error_at"] = time.monotonic()
        out["end"] = "closed"
    except httpx.HTTPError as exc:  # cut without the end of the chunked body
        out["end"] = repr(exc)
    out["lines"] = lines


@pytest.mark.slow
def test_a_stream_whose_leader_dies_ends_with_its_dialects_error_event(tmp_path, tiny_qwen3):
    # 20 ms per step: the streams would run for 30 s or more; they end with the leader
    srv = Server(tmp_path, tiny_models_toml(tiny_qwen3), env={"CORTEX_TEST_STEP_DELAY_S": "0.02"})
    try:
        srv.wait_healthy()
        children = srv.children()
        long = {"model": "tiny", "messages": HI, "max_tokens": 1500, "stream": True, "ignore_eos": True}
        streams = {"openai": ("/v1/chat/completions", long), "anthropic": ("/v1/messages", long)}
        outs = {d: {} for d in streams}
        started = {d: threading.Event() for d in streams}
        threads = [
            threading.Thread(target=_stream, args=(srv, path, body, started[d], outs[d]))
            for d, (path, body) in streams.items()
        ]
        for t in threads:
            t.start()
        for d in streams:
            assert started[d].wait(60), d
        killed_at = time.monotonic()
        os.kill(srv.proc.pid, signal.SIGKILL)
        for t in threads:
            t.join(120)

        oai, ant = outs["openai"], outs["anthropic"]
        data = [json.loads(ln[6:]) for ln in oai["lines"] if ln.startswith("data: {")]
        assert "error" in data[-1], (oai["end"], oai["lines"][-3:])
        assert data[-1]["error"]["code"] == "engine_unavailable"
        assert "data: [DONE]" not in oai["lines"]
        events = [ln for ln in ant["lines"] if ln.startswith("event: ")]
        assert events[-1] == "event: error", (ant["end"], ant["lines"][-4:])
        last = json.loads(ant["lines"][ant["lines"].index("event: error") + 1][6:])
        assert last["type"] == "error" and last["error"]["type"] == "overloaded_error"
        assert "event: message_stop" not in ant["lines"]
        # (how fast, for the record: well under the front's 5 s graceful stop, which cut them before)
        print(f"error events {[round(o['error_at'] - killed_at, 2) for o in outs.values()]} s after the kill")
        for pid in children:  # the front and the worker follow their leader
            wait_for(lambda p=pid: not _alive(p), what=f"process {pid} to exit")
    finally:
        srv.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of the killed leader's is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_the_engine_client_fails_a_stream_at_once_when_its_leader_exits(tmp_path):
    """The front's side alone: a scripted leader socket, and a stand-in leader process to kill."""
    endpoint = f"ipc://{tmp_path}/engine.sock"
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(endpoint)
    leader = subprocess.Popen(["sleep", "300"])
    client = EngineClient(endpoint, event_timeout_s=120, leader_pid=leader.pid)
    try:

        def answer() -> None:
            peer, payload = router.recv_multipart()
            rid = decode(payload)[1].request_id
            for ev in (Started(rid, 3), Delta(rid, "a", 1)):
                router.send_multipart([peer, encode(ev, 0)])

        t = threading.Thread(target=answer)
        t.start()
        gen = client.submit(Submit("r1", "m", HI, SamplingParams()))
        t.join()
        events = gen.events()
        assert isinstance(next(events), Delta)
        leader.kill()
        leader.wait()
        with pytest.raises(ApiError) as err:
            next(events)
        assert err.value.status == 503 and err.value.code == "engine_unavailable"
        # and a request sent after the leader is gone fails at once too
        with pytest.raises(ApiError) as err:
            client.query("health")
        assert err.value.code == "engine_unavailable"
    finally:
        if leader.poll() is None:
            leader.kill()
            leader.wait()
        client.close()
        router.close(linger=0)
        ctx.term()


@pytest.mark.slow
def test_a_body_that_stalls_half_way_is_a_408_and_frees_its_thread(tiny_server):
    """A client that sends its headers and part of a body, then nothing: after BODY_TIMEOUT_S it
    gets a 408 in JSON and the connection ends (it held a front thread for good before)."""
    import socket as socket_

    from cortex.api.rawbody import BODY_TIMEOUT_S

    port = int(tiny_server.url.rsplit(":", 1)[1])
    with socket_.create_connection(("127.0.0.1", port), timeout=BODY_TIMEOUT_S + 30) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"model": "tiny", '
        )
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:300]
    assert json.loads(body)["error"]["code"] == "request_timeout"

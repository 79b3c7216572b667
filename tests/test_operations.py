"""Operations: Prometheus metrics after real traffic, cortex-admin against a running daemon, the
admin socket's permissions, systemd notification, reload, drain, request logs, the unit file.

One `cortex serve` (module scope) runs through the tests in file order; the last one stops it with
SIGTERM while a stream is running.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import STOP_WAIT_S, Server, scrape, value, wait_for

ROOT = Path(__file__).resolve().parent.parent
HI = [{"role": "user", "content": "Hello, world! How are you today?"}]
NO_EOS = {"ignore_eos": True}  # random tiny models may sample their end token: counts stay exact
SECRET_PROMPT = "the-prompt-marker-" + uuid.uuid4().hex[:8]  # must never reach the log
NEW_KEY = "sk-reloaded-" + uuid.uuid4().hex[:8]

FAMILIES = [
    "cortex_requests",
    "cortex_request_duration_seconds",
    "cortex_prompt_tokens",
    "cortex_generation_tokens",
    "cortex_cached_prompt_tokens",
    "cortex_time_to_first_token_seconds",
    "cortex_inter_token_latency_seconds",
    "cortex_queue_time_seconds",
    "cortex_generation_tokens_per_second",
    "cortex_engine_request_duration_seconds",
    "cortex_running_sequences",
    "cortex_waiting_sequences",
    "cortex_kv_cache_usage_ratio",
    "cortex_kv_cache_blocks",
    "cortex_model_loads",
    "cortex_model_load_duration_seconds",
    "cortex_model_loaded",
    "cortex_evictions",
    "cortex_defrag_restarts",
    "cortex_model_loads_cancelled",
    "cortex_cancellations",
    "cortex_worker_restarts",
    "cortex_worker_up",
    "cortex_peer_up",
    "cortex_device_memory_bytes",
    "cortex_draining",
    "cortex_config_reloads",
]


def models_toml(model_dir: Path, extra: str = "") -> str:
    return (
        f'[[models]]\nid = "tiny"\npath = "{model_dir}"\npreload = true\nmax_context = 2048\n'
        f'[[models]]\nid = "spare"\npath = "{model_dir}"\nmax_context = 512\n{extra}'
        '[aliases]\nsmall = "tiny"\n'
    )


class NotifyListener:
    """A fake systemd: a datagram socket in the abstract namespace; on READY=1 it asks the API
    at once, to show the API answered before READY was sent."""

    def __init__(self) -> None:
        self.name = f"@cortex-test-{uuid.uuid4().hex[:12]}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + self.name[1:].encode())
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self.health_at_ready: int | None = None
        self.url = ""
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            if "READY=1" in data.split("\n") and self.health_at_ready is None:
                try:
                    self.health_at_ready = httpx.get(self.url + "/health", timeout=30).status_code
                except httpx.HTTPError:
                    self.health_at_ready = -1
            self.messages.append(data)

    def lines(self) -> list[str]:
        return [ln for m in list(self.messages) for ln in m.split("\n")]

    def close(self) -> None:
        self.running = False
        self.sock.close()


@pytest.fixture(scope="module")
def notify():
    listener = NotifyListener()
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_qwen3, notify):
    root = tmp_path_factory.mktemp("ops")
    # 10 ms per step: the drain and shutdown tests' 600-token streams are still running (6 s or
    # more) when the admin command, the signal and the late request arrive, however busy the machine
    env = {"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "1000000", "CORTEX_TEST_STEP_DELAY_S": "0.01"}
    server = Server(root, models_toml(tiny_qwen3), '[logging]\nformat = "json"\n', env=env)
    notify.url = server.url
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


def admin(srv: Server, *args: str, user: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [*(user or []), sys.executable, "-m", "cortex.admin_cli", "--run-dir", str(srv.root / "run"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)


def admin_json(srv: Server, *args: str) -> dict:
    r = admin(srv, *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def families(url: str) -> set[str]:
    return {f.name for f in text_string_to_metric_families(httpx.get(url, timeout=30).text)}


# -- systemd notification ------------------------------------------------------------------------------


def test_ready_reaches_notify_socket_only_after_the_api_answers(srv, notify):
    wait_for(lambda: "READY=1" in notify.lines(), what="READY=1")
    assert notify.health_at_ready in (200, 503), notify.health_at_ready  # the API answered (503: still loading)
    lines = notify.lines()
    assert any(ln.startswith("STATUS=") for ln in lines)
    wait_for(lambda: notify.lines().count("WATCHDOG=1") >= 2, what="watchdog pings at half of WATCHDOG_USEC")
    wait_for(lambda: any("1 model(s) loaded" in ln for ln in notify.lines()), what="a STATUS line after preload")


# -- metrics ---------------------------------------------------------------------------------------------


def test_metrics_after_traffic_match_the_usage_the_api_returned(srv):
    before = scrape(srv.metrics_url)
    oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused")
    ant = anthropic.Anthropic(base_url=srv.url, api_key="unused")
    prompt = completion = cached = 0

    r = oai.chat.completions.create(model="tiny", messages=HI, max_tokens=12, extra_body=NO_EOS)
    prompt += r.usage.prompt_tokens
    completion += r.usage.completion_tokens
    cached += r.usage.prompt_tokens_details.cached_tokens
    chunks = list(
        oai.chat.completions.create(
            model="small",
            messages=HI,
            max_tokens=9,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    usage = chunks[-1].usage
    prompt += usage.prompt_tokens
    completion += usage.completion_tokens
    cached += usage.prompt_tokens_details.cached_tokens
    m = ant.messages.create(model="tiny", max_tokens=7, messages=HI)
    prompt += m.usage.input_tokens + m.usage.cache_read_input_tokens
    completion += m.usage.output_tokens
    cached += m.usage.cache_read_input_tokens
    bad = httpx.post(srv.url + "/v1/chat/completions", json={"model": "nope", "messages": HI}, timeout=30)
    assert bad.status_code == 404

    def requests(**labels) -> float:
        return value(scrape(srv.metrics_url), "cortex_requests_total", **labels) - value(
            before, "cortex_requests_total", **labels
        )

    wait_for(lambda: requests() == 4, what="four requests counted")
    # gauges follow the leader's state a few times a second
    wait_for(lambda: value(scrape(srv.metrics_url), "cortex_running_sequences", model="tiny") == 0, what="gauges")
    after = scrape(srv.metrics_url)

    def delta(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert requests(dialect="openai", endpoint="chat", status="200", node="test") == 2
    assert requests(dialect="anthropic", endpoint="messages", status="200", model="tiny") == 1
    assert requests(status="404", model="") == 1  # an unknown model is never a label value
    assert delta("cortex_prompt_tokens_total", model="tiny") == prompt
    assert delta("cortex_generation_tokens_total", model="tiny") == completion == 12 + 9 + m.usage.output_tokens
    assert delta("cortex_cached_prompt_tokens_total", model="tiny") == cached > 0  # the same prompt thrice
    assert delta("cortex_time_to_first_token_seconds_count", model="tiny") == 3
    assert delta("cortex_queue_time_seconds_count", model="tiny") == 3
    assert delta("cortex_inter_token_latency_seconds_count", model="tiny") == completion - 3
    assert delta("cortex_generation_tokens_per_second_count", model="tiny") == 3
    assert delta("cortex_request_duration_seconds_count", model="tiny") == 2  # "small" is counted as sent
    assert delta("cortex_engine_request_duration_seconds_count", model="tiny", outcome="finished") == 3
    assert 0 < delta("cortex_time_to_first_token_seconds_sum", model="tiny") < 30
    assert value(after, "cortex_model_loads_total", model="tiny", outcome="ok") == 1
    assert value(after, "cortex_model_load_duration_seconds_count", model="tiny") == 1
    assert value(after, "cortex_model_loaded", model="tiny") == 1
    assert value(after, "cortex_model_loaded", model="spare") == 0
    assert value(after, "cortex_worker_up", rank="0", device="cpu") == 1
    assert value(after, "cortex_running_sequences", model="tiny") == 0
    assert value(after, "cortex_waiting_sequences", model="tiny") == 0
    assert value(after, "cortex_kv_cache_blocks", model="tiny", state="total") > 0
    assert 0 <= value(after, "cortex_kv_cache_usage_ratio", model="tiny") <= 1
    assert value(after, "cortex_draining") == 0
    assert value(after, "cortex_device_memory_bytes", rank="0", device="cpu", kind="used") > 0
    assert value(after, "cortex_device_memory_bytes", rank="0", kind="budget") > 0


def test_a_client_that_leaves_mid_stream_counts_as_a_decode_cancellation(srv):
    before = scrape(srv.metrics_url)
    body = {"model": "tiny", "messages": HI, "max_tokens": 1500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n > 6:
                break

    def cancelled() -> float:
        return value(scrape(srv.metrics_url), "cortex_cancellations_total", model="tiny", stage="decode") - value(
            before, "cortex_cancellations_total", model="tiny", stage="decode"
        )

    wait_for(lambda: cancelled() == 1, what="a decode cancellation")
    after = scrape(srv.metrics_url)
    assert (
        value(after, "cortex_requests_total", status="499") - value(before, "cortex_requests_total", status="499") == 1
    )
    assert value(after, "cortex_engine_request_duration_seconds_count", outcome="cancelled") >= 1


def test_every_metric_family_is_exported_on_both_ports(srv):
    srv_families = families(srv.metrics_url)
    missing = [f for f in FAMILIES if f not in srv_families]
    assert not missing, missing
    api = httpx.get(srv.url + "/metrics", timeout=30)
    assert api.status_code == 200 and "cortex_requests_total" in api.text
    doc = (ROOT / "docs" / "metrics.md").read_text()
    assert [f for f in FAMILIES if f"`{f}" not in doc] == []  # each family is documented


# -- the request log ---------------------------------------------------------------------------------------


def test_one_json_log_line_per_request_without_prompt_or_key(srv):
    oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-never-logged-123")
    msgs = [{"role": "user", "content": SECRET_PROMPT}]
    r = oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=5)

    def line() -> dict | None:
        for raw in (srv.root / "serve.log").read_text().splitlines():
            if raw.startswith("{") and r.id in raw:
                return json.loads(raw)
        return None

    wait_for(lambda: line() is not None, what="the request's log line")
    rec = line()
    assert rec["logger"] == "cortex.request" and rec["id"] == r.id
    assert rec["model"] == "tiny" and rec["dialect"] == "openai" and rec["status"] == 200
    assert rec["prompt_tokens"] == r.usage.prompt_tokens and rec["completion_tokens"] == r.usage.completion_tokens
    assert rec["duration_ms"] >= rec["ttft_ms"] > 0
    log = (srv.root / "serve.log").read_text()
    assert SECRET_PROMPT not in log and "sk-never-logged-123" not in log


# -- cortex-admin ------------------------------------------------------------------------------------------


def test_admin_socket_is_the_daemon_users_alone(srv):
    sock = srv.root / "run" / "admin.sock"
    st = sock.stat()
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.getuid()
    if os.getuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root to run cortex-admin as another user")
    r = admin(srv, "status", user=["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "permission denied" in r.stderr


def test_admin_says_when_the_daemon_is_not_running(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "cortex.admin_cli", "--run-dir", str(tmp_path), "status"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2 and "not running" in r.stderr and str(tmp_path) in r.stderr


def test_admin_reads_status_models_workers_peers(srv):
    status = admin_json(srv, "status")
    assert status["status"] == "ok" and status["node"] == "test"
    models = {m["id"]: m for m in admin_json(srv, "models")["models"]}
    assert models["tiny"]["status"] == "loaded" and models["spare"]["status"] == "unloaded"
    workers = admin_json(srv, "workers")["workers"]
    assert workers[0]["alive"] and workers[0]["device"] == "cpu"
    assert admin_json(srv, "peers") == {"peers": []}
    human = admin(srv, "status")
    assert human.returncode == 0 and "node test: ok" in human.stdout and "tiny" in human.stdout


def test_admin_clear_cache_drops_cached_prompts(srv):
    """cortex-admin clear-cache: no cached prompt survives (the workers zero the blocks; the
    worker side is tests/test_rpc_wire.py); the next identical prompt is computed anew."""
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "clear-cache " * 40}]
    client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    again = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert again.usage.prompt_tokens_details.cached_tokens > 0

    def cached_blocks() -> int:
        return {m["id"]: m for m in srv.health()["models"]}["tiny"]["engine"]["kv_blocks_cached"]

    assert cached_blocks() > 0
    assert admin_json(srv, "clear-cache", "tiny")["status"] == "loaded"
    assert cached_blocks() == 0
    fresh = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    r = admin(srv, "clear-cache", "spare")
    assert r.returncode == 1 and "not loaded" in r.stderr


def test_admin_load_pin_unpin_evict_unload(srv):
    before = scrape(srv.metrics_url)
    loaded = admin_json(srv, "load", "spare")
    assert loaded["status"] == "loaded" and loaded["devices"] == ["cpu"]
    assert admin_json(srv, "pin", "spare")["pinned"] is True
    kept = admin(srv, "evict", "spare")
    assert kept.returncode == 1 and "pinned" in kept.stderr
    assert admin_json(srv, "unpin", "spare")["pinned"] is False
    assert admin_json(srv, "evict", "spare")["status"] == "unloaded"
    r = admin(srv, "evict", "spare")
    assert r.returncode == 1 and "not loaded" in r.stderr
    assert admin_json(srv, "load", "spare")["status"] == "loaded"
    assert admin_json(srv, "unload", "spare")["status"] == "unloaded"
    missing = admin(srv, "load", "nope")
    assert missing.returncode == 1 and "nope" in missing.stderr
    after = scrape(srv.metrics_url)
    assert (
        value(after, "cortex_evictions_total", reason="admin") - value(before, "cortex_evictions_total", reason="admin")
        == 1
    )
    assert value(after, "cortex_model_loads_total", model="spare", outcome="ok") == 2


# -- reload -----------------------------------------------------------------------------------------------


def test_reload_with_a_broken_file_keeps_serving_and_says_why(srv, tiny_qwen3):
    good = (srv.root / "models.toml").read_text()
    oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused")
    try:
        (srv.root / "models.toml").write_text(good + "[[models]]\nid = 'broken'\n")  # neither path nor source
        r = admin(srv, "reload")
        assert r.returncode == 1
        assert "models.toml" in r.stderr and "exactly one of 'path' or 'source'" in r.stderr
        (srv.root / "models.toml").write_text("this is = = not toml")
        os.kill(srv.proc.pid, signal.SIGHUP)
        wait_for(
            lambda: "reload rejected" in srv.logs(tail=0) and "TOML syntax error" in srv.logs(tail=0), what="the log"
        )
        assert (
            oai.chat.completions.create(
                model="tiny", messages=HI, max_tokens=3, extra_body=NO_EOS
            ).usage.completion_tokens
            == 3
        )
        assert srv.health()["status"] == "ok"
    finally:
        (srv.root / "models.toml").write_text(good)


def test_reload_applies_keys_and_catalogue_and_leaves_unchanged_models_alone(srv, tiny_qwen3):
    cortex_toml = (srv.root / "cortex.toml").read_text()
    good_models = (srv.root / "models.toml").read_text()
    tiny_before = {m["id"]: m for m in admin_json(srv, "models")["models"]}["tiny"]
    try:
        (srv.root / "cortex.toml").write_text(
            cortex_toml.replace("[gateway]\n", f'[gateway]\napi_keys = ["{NEW_KEY}"]\n').replace(
                "threads = 8", "threads = 9"
            )
        )
        (srv.root / "models.toml").write_text(
            models_toml(tiny_qwen3, extra="tensor_parallel = 1\n").replace("max_context = 512", "max_context = 300")
            + f'[[models]]\nid = "extra"\npath = "{tiny_qwen3}"\n'
        )
        result = admin_json(srv, "reload")
        assert result["added"] == ["extra"] and result["changed"] == ["spare"] and result["unchanged"] == ["tiny"]
        assert result["restart_required"] == ["[gateway] threads"]
        denied = httpx.post(srv.url + "/v1/chat/completions", json={"model": "tiny", "messages": HI}, timeout=30)
        assert denied.status_code == 401
        oai = openai.OpenAI(base_url=srv.url + "/v1", api_key=NEW_KEY)
        assert (
            oai.chat.completions.create(
                model="extra", messages=HI, max_tokens=2, extra_body=NO_EOS
            ).usage.completion_tokens
            == 2
        )
        models = {m["id"]: m for m in admin_json(srv, "models")["models"]}
        assert models["tiny"]["status"] == "loaded"
        assert models["spare"]["context_length"] is None or models["spare"]["status"] == "unloaded"
        metrics = scrape(srv.metrics_url)
        assert value(metrics, "cortex_model_loads_total", model="tiny") == 1  # never reloaded
        assert value(metrics, "cortex_config_reloads_total", result="rejected") == 2
    finally:
        (srv.root / "cortex.toml").write_text(cortex_toml)
        (srv.root / "models.toml").write_text(good_models)
    result = admin_json(srv, "reload")
    assert result["removed"] == ["extra"] and result["changed"] == ["spare"]
    assert httpx.post(srv.url + "/v1/chat/completions", json={"model": "extra", "messages": HI}).status_code == 404
    tiny_after = {m["id"]: m for m in admin_json(srv, "models")["models"]}["tiny"]
    assert tiny_after["status"] == "loaded" and tiny_after["devices"] == tiny_before["devices"]


# -- workers -----------------------------------------------------------------------------------------------


def test_a_dead_worker_is_counted_restarted_and_its_model_reloaded(srv):
    before = scrape(srv.metrics_url)
    pid = admin_json(srv, "workers")["workers"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: admin_json(srv, "workers")["workers"][0]["pid"] != pid, what="a new worker")
    srv.wait_healthy()
    wait_for(lambda: value(scrape(srv.metrics_url), "cortex_worker_up", rank="0") == 1, what="worker up again")
    after = scrape(srv.metrics_url)
    assert (
        value(after, "cortex_worker_restarts_total", rank="0", device="cpu")
        - value(before, "cortex_worker_restarts_total", rank="0", device="cpu")
        == 1
    )
    loads = value(after, "cortex_model_loads_total", model="tiny", outcome="ok")
    assert loads - value(before, "cortex_model_loads_total", model="tiny", outcome="ok") == 1  # reloaded


# -- drain and shutdown -------------------------------------------------------------------------------------


def _long_stream(srv: Server, started: threading.Event, out: dict) -> None:
    body = {"model": "tiny", "messages": HI, "max_tokens": 600, "stream": True, "ignore_eos": True}
    lines = []
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line)
                started.set()
    out["lines"] = lines


def test_drain_lets_a_running_stream_finish_and_refuses_new_requests(srv):
    started, out = threading.Event(), {}
    t = threading.Thread(target=_long_stream, args=(srv, started, out))
    t.start()
    assert started.wait(30)
    try:
        drained = admin_json(srv, "drain")
        assert drained["draining"] is True
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "tiny", "messages": HI}, timeout=30)
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
        assert r.json()["error"]["code"] == "draining"
        a = httpx.post(srv.url + "/v1/messages", json={"model": "tiny", "messages": HI, "max_tokens": 3}, timeout=30)
        assert a.status_code == 503 and a.json()["type"] == "error" and "retry-after" in a.headers
        h = httpx.get(srv.url + "/health", timeout=30)
        assert h.status_code == 503 and h.json()["status"] == "draining" and h.json()["draining"] is True
        wait_for(lambda: value(scrape(srv.metrics_url), "cortex_draining") == 1, what="the draining gauge")
        t.join(120)
        assert out["lines"][-1] == "data: [DONE]"
        assert json.loads(out["lines"][-2][6:])["choices"][0]["finish_reason"] == "length"
    finally:
        admin_json(srv, "undrain")
    assert httpx.get(srv.url + "/health", timeout=30).status_code == 200


def test_sigterm_drains_a_running_stream_then_stops(srv, notify):
    started, out = threading.Event(), {}
    t = threading.Thread(target=_long_stream, args=(srv, started, out))
    t.start()
    assert started.wait(30)
    srv.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "STOPPING=1" in notify.lines(), what="STOPPING=1")
    late = httpx.post(srv.url + "/v1/chat/completions", json={"model": "tiny", "messages": HI}, timeout=30)
    assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
    t.join(120)
    assert out["lines"][-1] == "data: [DONE]", out["lines"][-3:]
    srv.proc.wait(STOP_WAIT_S)
    assert srv.proc.returncode == 0


# -- the systemd unit ---------------------------------------------------------------------------------------


def test_systemd_unit_verifies():
    unit = ROOT / "systemd" / "cortex.service"
    text = unit.read_text()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "User=cortex", "RuntimeDirectory=cortex"):
        assert line in text
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed (.ci/run installs it)")
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.strip() == "", r.stderr


# -- the parts, without a server ------------------------------------------------------------------------------


def test_notifier_addresses_and_watchdog_interval():
    from cortex.ops.notify import Notifier

    assert Notifier({"NOTIFY_SOCKET": "@abc"}).address == b"\0abc"
    assert Notifier({"NOTIFY_SOCKET": "/run/systemd/notify"}).address == "/run/systemd/notify"
    assert not Notifier({}).enabled
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "60000000"}).watchdog_s == 30
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}).watchdog_s is None


def test_reload_diff_and_restart_only_settings(tmp_path, tiny_qwen3):
    from cortex.config import load
    from cortex.ops.reload import diff_catalogue, keep_restart_only

    def write(listen: str, models: str) -> None:
        (tmp_path / "models.toml").write_text(models)
        (tmp_path / "cortex.toml").write_text(f'[gateway]\nlisten = "{listen}"\n[eviction]\nstrategy = "priority"\n')

    write("127.0.0.1:1000", models_toml(tiny_qwen3))
    old = load(tmp_path / "cortex.toml")
    write("127.0.0.1:2000", models_toml(tiny_qwen3).replace("max_context = 512", "max_context = 100"))
    new, ignored = keep_restart_only(old, load(tmp_path / "cortex.toml"))
    assert ignored == ["[gateway] listen"] and new.gateway.listen.port == 1000
    d = diff_catalogue(old.catalogue, new.catalogue)
    assert (d.added, d.removed, [e.id for e in d.changed], d.unchanged) == ([], [], ["spare"], ["tiny"])


def test_config_operations_keys(tmp_path):
    from cortex.config import ConfigError, load

    (tmp_path / "models.toml").write_text("")
    (tmp_path / "cortex.toml").write_text(
        '[node]\ndrain_timeout_s = 5\n[logging]\nformat = "json"\nlog_content = true\n'
    )
    cfg = load(tmp_path / "cortex.toml")
    assert (cfg.node.drain_timeout_s, cfg.log_format, cfg.log_content) == (5.0, "json", True)
    (tmp_path / "cortex.toml").write_text('[logging]\nformat = "xml"\n')
    with pytest.raises(ConfigError, match="format"):
        load(tmp_path / "cortex.toml")

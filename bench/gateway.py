"""What a routing hop costs: the same requests sent directly to leader B and through leader A.

    .venv/bin/python bench/gateway.py [--clients 1,16,64] [--requests 400] [--tokens 4]

B serves a tiny random Qwen3 (its compute is not what is measured); A is a device-less gateway with
B as its only peer, so every request to A is forwarded. At each concurrency N, N clients each send
requests alternately to B and to A (which goes first alternates too), each a non-streamed chat
completion of a few tokens, so both paths see the same load at the same moments. Reported: p50 and
p99 latency of each path and what the hop adds (A minus B), and the same for the first byte of a
streamed request.

Targets (issue 20): the hop adds under 1 ms at p50 with one client and under 5 ms at p50 with 64
concurrent clients; each row at those concurrencies says whether it is met. Both leaders share
this machine's cores, so under concurrency A's work also slows B: the "added" figure then includes
what the gateway's CPU takes from the server it forwards to.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.serve import pct  # noqa: E402

HI = [{"role": "user", "content": "Hello, world!"}]
TARGETS_MS = {1: 1.0, 64: 5.0}  # clients: most the hop may add at p50


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model(into: Path) -> Path:
    from tests.checkpoints import make_checkpoint, write_chatml_tokenizer_config
    from tests.conftest import train_tiny_tokenizer

    make_checkpoint(into, "qwen3", tied=True)
    train_tiny_tokenizer(into)
    write_chatml_tokenizer_config(into)
    return into


def _serve(
    root: Path, name: str, devices: str, port: int, models: str, extra: str, threads: int = 0
) -> subprocess.Popen:
    root.mkdir(parents=True, exist_ok=True)
    (root / "models.toml").write_text(models)
    (root / "cortex.toml").write_text(
        f'[node]\nname = "{name}"\ndevices = {devices}\nrun_dir = "{root}"\nthreads = 1\n'
        f'[gateway]\nlisten = "127.0.0.1:{port}"\nmetrics_listen = "127.0.0.1:{_port()}"\nworkers = 2\n'
        + (f"threads = {threads}\n" if threads else "")  # else the front's default
        + "[engine]\nkv_cache_mb = 64\nmax_requests_per_client = 0\n"
        f"[fleet]\npoll_interval_s = 1\n{extra}"
    )
    log = open(root / "serve.log", "wb")  # noqa: SIM115 (lives as long as the process)
    cmd = [sys.executable, "-m", "cortex.cli", "serve", "--config", str(root / "cortex.toml")]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


@contextlib.contextmanager
def two_leaders(threads: int = 0) -> Iterator[tuple[str, str]]:
    """(url of A, url of B), both answering, A routing to B."""
    root = Path(tempfile.mkdtemp(prefix="cortex-gw-"))
    model = _tiny_model(root / "model")
    pa, pb = _port(), _port()
    b = _serve(
        root / "b", "B", '["cpu"]', pb, f'[[models]]\nid = "tiny"\npath = "{model}"\npreload = true\n', "", threads
    )
    a = _serve(root / "a", "A", "[]", pa, "", f'[[peers]]\nname = "B"\nendpoint = "http://127.0.0.1:{pb}"\n', threads)
    url_a, url_b = f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pb}"
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.post(url_a + "/v1/chat/completions", json=_body(False), timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline or a.poll() is not None or b.poll() is not None:
                raise RuntimeError(f"the leaders did not come up; logs in {root}")
            time.sleep(0.5)
        yield url_a, url_b
    finally:
        for p in (a, b):
            p.send_signal(signal.SIGTERM)
        for p in (a, b):
            p.wait(20)


def _body(stream: bool, tokens: int = 4) -> dict:
    return {"model": "tiny", "messages": HI, "max_tokens": tokens, "temperature": 0, "stream": stream}


def _once(http: httpx.Client, url: str, stream: bool, tokens: int) -> float:
    """Seconds to the whole answer, or (streamed) to the first byte of the body."""
    t0 = time.perf_counter()
    if not stream:
        r = http.post(url + "/v1/chat/completions", json=_body(False, tokens))
        r.raise_for_status()
        return time.perf_counter() - t0
    with http.stream("POST", url + "/v1/chat/completions", json=_body(True, tokens)) as r:
        r.raise_for_status()
        chunks = r.iter_raw()
        next(chunks)
        first = time.perf_counter() - t0
        for _ in chunks:
            pass
    return first


def run(url_a: str, url_b: str, clients: int, requests: int, tokens: int, stream: bool) -> dict:
    """``requests`` per path in all, shared among the clients."""
    times: dict[str, list[float]] = {"A": [], "B": []}
    lock = threading.Lock()
    per_client = max(1, requests // clients)

    def client(c: int) -> None:
        with httpx.Client(timeout=120) as http:
            for k in range(per_client):
                order = [("B", url_b), ("A", url_a)] if (c + k) % 2 else [("A", url_a), ("B", url_b)]
                for name, url in order:
                    t = _once(http, url, stream, tokens)
                    with lock:
                        times[name].append(t)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = times["A"], times["B"]
    return {
        "clients": clients,
        "n": len(a),
        "b50": pct(b, 50),
        "b99": pct(b, 99),
        "a50": pct(a, 50),
        "a99": pct(a, 99),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", default="1,16,64")
    p.add_argument("--requests", type=int, default=384, help="per path and concurrency")
    p.add_argument("--tokens", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="[gateway] threads of both leaders (0: the default)")
    args = p.parse_args()
    verdicts = []
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu}, {os.cpu_count()} cores,", end=" ")
    print(f"load average {os.getloadavg()[0]:.1f}, [gateway] threads {args.threads or 'default'}")
    with two_leaders(args.threads) as (url_a, url_b):
        with httpx.Client() as http:  # warm both paths: connections, code paths, the peer pool
            for _ in range(20):
                _once(http, url_a, False, args.tokens)
                _once(http, url_b, False, args.tokens)
        for stream, what in ((False, f"whole answer, {args.tokens} tokens"), (True, "first byte, streamed")):
            print(f"# {what}: directly to B vs through A (a gateway), same run")
            print(
                f"{'clients':>7} {'n':>5} {'B p50':>8} {'A p50':>8} {'added':>7} {'B p99':>8} {'A p99':>8} {'added':>7}"
                "  target (added p50)"
            )
            for n in (int(x) for x in args.clients.split(",")):
                r = run(url_a, url_b, n, args.requests, args.tokens, stream)
                added = (r["a50"] - r["b50"]) * 1e3
                verdict = ""
                if n in TARGETS_MS:
                    met = added < TARGETS_MS[n]
                    verdict = f"  < {TARGETS_MS[n]:g} ms: {'met' if met else 'NOT met'}"
                    verdicts.append(f"{what}, {n} client(s): {added:.1f} ms added at p50{verdict}")
                print(
                    f"{r['clients']:>7} {r['n']:>5} {r['b50'] * 1e3:>6.1f}ms {r['a50'] * 1e3:>6.1f}ms "
                    f"{(r['a50'] - r['b50']) * 1e3:>5.1f}ms {r['b99'] * 1e3:>6.1f}ms {r['a99'] * 1e3:>6.1f}ms "
                    f"{(r['a99'] - r['b99']) * 1e3:>5.1f}ms{verdict}",
                    flush=True,
                )
    print("# targets")
    for line in verdicts:
        print(line)


if __name__ == "__main__":
    main()

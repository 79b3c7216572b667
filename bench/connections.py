"""Does the front hold many connections? Idle keep-alive clients, slow-header clients (slowloris)
and many concurrent streams against `cortex serve` with the default model.

    .venv/bin/python bench/connections.py [--idle 1000] [--slow 64] [--streams 256]

1. Open ``--idle`` keep-alive connections (each completes one request, then stays open and silent)
   and ``--slow`` connections that send a request's headers one byte a second and never finish;
   then time one new chat completion from a fresh client. Target: answered in under 2 s.
2. ``--streams`` clients stream a chat completion at once (16 tokens each, ``ignore_eos``); every
   one must complete (the engine batches ``max_seqs`` of them at a time and queues the rest).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import socket
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.server import running_server  # noqa: E402

CHAT = {"model": "default", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 1}


def idle_connections(host: str, port: int, n: int) -> list[socket.socket]:
    """Keep-alive connections that completed one request and now say nothing."""
    out = []
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=30)
        s.sendall(f"GET /health/live HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        s.recv(4096)  # its answer; the connection stays open
        out.append(s)
    return out


def slow_clients(host: str, port: int, n: int, stop: threading.Event) -> list[socket.socket]:
    """Connections that trickle a request's headers one byte a second, forever."""
    socks = [socket.create_connection((host, port), timeout=30) for _ in range(n)]
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000

    def trickle() -> None:
        for i in range(len(head)):
            if stop.wait(1.0):
                return
            for s in socks:
                with contextlib.suppress(OSError):
                    s.send(head[i : i + 1])

    threading.Thread(target=trickle, daemon=True).start()
    return socks


def timed_chat(url: str, timeout: float = 60) -> tuple[float, int]:
    t = urlsplit(url)
    conn = http.client.HTTPConnection(t.hostname, t.port, timeout=timeout)
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(CHAT), {"Content-Type": "application/json"})
        status = conn.getresponse().status
    except OSError:
        status = 0
    finally:
        conn.close()
    return time.perf_counter() - t0, status


def stream(url: str, results: list, i: int) -> None:
    t = urlsplit(url)
    body = {**CHAT, "max_tokens": 16, "stream": True, "ignore_eos": True}
    body["messages"] = [{"role": "user", "content": f"Count to ten ({i})."}]
    conn = http.client.HTTPConnection(t.hostname, t.port, timeout=600)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        text = r.read().decode()
        results[i] = r.status == 200 and "[DONE]" in text and '"error"' not in text
    except OSError:
        results[i] = False
    finally:
        conn.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--idle", type=int, default=1000)
    p.add_argument("--slow", type=int, default=64)
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--front-threads", type=int, help="[gateway] threads (default: the configured default)")
    p.add_argument("--max-seqs", type=int, default=256, help="[engine] max_seqs: the engine's batch")
    p.add_argument("--engine", default="", help="more [engine] settings, TOML lines")
    args = p.parse_args()
    gateway = f"threads = {args.front_threads}" if args.front_threads else ""
    engine = (
        f"max_seqs = {args.max_seqs}\nmax_waiting = 1024\nmax_requests_per_client = 0\n" + args.engine
    )  # one client address
    with running_server(2, engine, gateway=gateway) as url:
        host, port = urlsplit(url).hostname, urlsplit(url).port
        print(f"a chat completion, quiet server: {timed_chat(url)[0] * 1e3:.0f} ms")
        stop = threading.Event()
        t0 = time.perf_counter()
        idle = idle_connections(host, port, args.idle)
        slow = slow_clients(host, port, args.slow, stop)
        print(
            f"{len(idle)} idle keep-alive + {len(slow)} slow-header connections open ({time.perf_counter() - t0:.1f} s)"
        )
        time.sleep(4)  # the slow clients have sent a few bytes each; keep-alive (5 s) still holds the idle ones
        seconds, status = timed_chat(url, timeout=30)
        verdict = "met" if status == 200 and seconds < 2 else "NOT met"
        print(
            f"a new chat completion beside them: HTTP {status or 'none'} in {seconds:.2f} s (target < 2 s: {verdict})"
        )
        stop.set()
        for s in idle + slow:
            s.close()
        peak = [0]

        def watch() -> None:  # the engine's running batch, from /health, while the streams run
            while not done.is_set():
                with contextlib.suppress(Exception):
                    conn = http.client.HTTPConnection(host, port, timeout=10)
                    conn.request("GET", "/health")
                    peak[0] = max(peak[0], json.loads(conn.getresponse().read())["requests"]["running"])
                    conn.close()
                done.wait(0.5)

        done = threading.Event()
        threading.Thread(target=watch, daemon=True).start()
        results: list = [None] * args.streams
        threads = [threading.Thread(target=stream, args=(url, results, i)) for i in range(args.streams)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()
        ok = sum(1 for r in results if r)
        wall = time.perf_counter() - t0
        print(f"{args.streams} concurrent streams: {ok} completed in {wall:.1f} s ({ok * 16 / wall:.0f} tokens/s)")
        print(f"  the largest batch the engine ran: {peak[0]} sequences")


if __name__ == "__main__":
    main()

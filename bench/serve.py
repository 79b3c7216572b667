"""Serving under load: N concurrent streaming clients against `cortex serve` with the default model.

    .venv/bin/python bench/serve.py [--clients 1,4,16] [--tokens 64] [--requests 2] [--rounds 3]

For each N, every client sends its requests one after another (distinct prompts, so the prefix cache
does not flatter the numbers) and the script reports aggregate generated tokens/s, time to first
token (TTFT) and inter-token latency (ITL) percentiles, and the ratio to N = 1; rounds alternate
the client counts and the ratio's median over rounds is the figure to quote. Then it sends the
same 1,000-token prompt twice and reports both TTFTs: the second reuses the first's KV blocks.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.server import running_server  # noqa: E402


def stream_once(url: str, content: str, max_tokens: int) -> dict:
    """One streamed chat completion: timestamps of its content events and its usage.

    A plain http.client connection, and JSON parsed only for the final usage event: the client
    runs on the server's own cores here, and httpx plus a json.loads per token took 0.16-0.2 of
    this machine's 2 cores at 16 streams (the server's share, not the server's cost)."""
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    target = urlsplit(url)
    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=600)
    t0 = time.perf_counter()
    stamps, usage = [], None
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        for line in resp:
            if line.startswith(b'data: {"id"'):
                if b'"usage":{' in line:
                    usage = json.loads(line[6:])["usage"]
                elif b'"delta":{"content":"' in line and b'"content":""' not in line:
                    stamps.append(time.perf_counter())
    finally:
        conn.close()
    return {
        "ttft": stamps[0] - t0,
        "itl": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
        "tokens": usage["completion_tokens"],
        "cached": usage["prompt_tokens_details"]["cached_tokens"],
    }


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))] if values else float("nan")


def load_run(url: str, clients: int, requests: int, tokens: int) -> dict:
    results, lock = [], threading.Lock()

    def client(c: int) -> None:
        for k in range(requests):
            res = stream_once(url, f"Client {c}, request {k}: tell me a long story about the sea.", tokens)
            with lock:
                results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    return {
        "clients": clients,
        "tok_s": sum(r["tokens"] for r in results) / wall,
        "ttft_p50": pct(ttft, 50),
        "ttft_p99": pct(ttft, 99),
        "itl_p50": pct(itl, 50),
        "itl_p99": pct(itl, 99),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds over the client counts")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--url", help="an already running server (default: start one)")
    args = p.parse_args()

    def run(url: str) -> None:
        stream_once(url, "warm up", 8)
        counts = [int(n) for n in args.clients.split(",")]
        # rounds alternate the client counts, so a slow minute on a shared machine hits every N
        rounds = [[load_run(url, n, args.requests, args.tokens) for n in counts] for _ in range(args.rounds)]
        print(
            f"# cortex serve, default model, {args.tokens} tokens per request, {args.requests} requests per client, "
            f"{args.rounds} rounds"
        )
        print(f"{'clients':>7} {'tok/s':>8} {'x N=1':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}")
        for k, rows in enumerate(rounds, start=1):
            base = rows[0]["tok_s"]
            for r in rows:
                print(
                    f"{r['clients']:>7} {r['tok_s']:>8.1f} {r['tok_s'] / base:>6.2f} {r['ttft_p50'] * 1e3:>7.0f}ms "
                    f"{r['ttft_p99'] * 1e3:>7.0f}ms {r['itl_p50'] * 1e3:>6.0f}ms {r['itl_p99'] * 1e3:>6.0f}ms"
                    + (f"   (round {k})" if r is rows[0] else "")
                )
        for i, n in enumerate(counts[1:], start=1):
            ratios = sorted(rows[i]["tok_s"] / rows[0]["tok_s"] for rows in rounds)
            print(f"N={n} vs N={counts[0]}: median {ratios[len(ratios) // 2]:.2f}x over {len(ratios)} rounds "
                  f"(range {ratios[0]:.2f}-{ratios[-1]:.2f})")  # fmt: skip
        long_prompt = " ".join(f"word{i}" for i in range(260))  # about 1,000 tokens with the template
        first = stream_once(url, long_prompt, 4)
        second = stream_once(url, long_prompt, 4)
        print(
            f"1,000-token prompt: TTFT {first['ttft'] * 1e3:.0f} ms, then {second['ttft'] * 1e3:.0f} ms with "
            f"{second['cached']} cached tokens: {first['ttft'] / second['ttft']:.1f}x faster"
        )

    if args.url:
        run(args.url)
    else:
        with running_server(args.threads) as url:
            run(url)


if __name__ == "__main__":
    main()

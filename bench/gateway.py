"""What a routing hop costs: the same requests sent directly to leader B and through leader A.

    .venv/bin/python bench/gateway.py [--clients 1,16,64] [--requests 400] [--tokens 4]
                                      [--route-cache-s 0,0.5 [--rounds 2]] [--shared]

B serves a tiny random Qwen3 (its compute is not what is measured); A is a device-less gateway with
B as its only peer, so every request to A is forwarded. At each concurrency N, N clients each send
requests alternately to B and to A (which goes first alternates too), each a non-streamed chat
completion of a few tokens, so both paths see the same load at the same moments. Reported: p50 and
p99 latency of each path and what the hop adds (A minus B), and the same for the first byte of a
streamed request; and "A cpu": the CPU time (user + system, from /proc) of A's processes (leader,
front) over the run divided by the requests sent to A, i.e. what a forwarded request costs the gateway
(10 ms clock ticks per process: read it over a few hundred requests).

Targets (issue 20): the hop adds under 1 ms at p50 with one client and under 5 ms at p50 with 64
concurrent clients; each row at those concurrencies says whether it is met. In a fleet the gateway
and the peers it routes to are different hosts, so by default A runs on a core of its own and B
and the clients on the others (``--pin``). With ``--shared`` they share every core, and under
concurrency A's work also slows B: the "added" figure then includes what the gateway's CPU takes
from the server it forwards to (on a 2-core machine, mostly that).

``--route-cache-s`` runs the whole measurement once per value, each with fresh leaders started with
that ``[gateway] route_cache_s`` (how long A's front reuses its leader's routing answer; 0: it asks
the leader for every request), and ``--rounds`` repeats the list, so settings alternate in one
sitting.
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
CORES = sorted(os.sched_getaffinity(0))  # before --pin moves this process


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
    root: Path, name: str, devices: str, port: int, models: str, extra: str, gateway: str, cpus: set[int] | None = None
) -> subprocess.Popen:
    """A leader; ``gateway``: more [gateway] keys, ``extra``: more tables; ``cpus``: the cores it
    and its processes may run on (None: any)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "models.toml").write_text(models)
    (root / "cortex.toml").write_text(
        f'[node]\nname = "{name}"\ndevices = {devices}\nrun_dir = "{root}"\nthreads = 1\n'
        f'[gateway]\nlisten = "127.0.0.1:{port}"\nmetrics_listen = "127.0.0.1:{_port()}"\nworkers = 2\n{gateway}'
        "[engine]\nkv_cache_mb = 64\nmax_requests_per_client = 0\n"
        f"[fleet]\npoll_interval_s = 1\n{extra}"
    )
    log = open(root / "serve.log", "wb")  # noqa: SIM115 (lives as long as the process)
    cmd = [sys.executable, "-m", "cortex.cli", "serve", "--config", str(root / "cortex.toml")]
    pin = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin)  # noqa: PLW1509


@contextlib.contextmanager
def two_leaders(threads: int = 0, route_cache_s: str = "", pin: bool = False) -> Iterator[tuple[str, str, int]]:
    """(url of A, url of B, pid of A's leader), both answering, A routing to B; ``threads`` and
    ``route_cache_s``: the leaders' [gateway] keys (0 or "": their defaults). ``pin``: A on the
    first core, B and this process (the clients) on the others, as if the gateway were a host of
    its own (a gateway and the peers it routes to are different machines in a fleet)."""
    root = Path(tempfile.mkdtemp(prefix="cortex-gw-"))
    model = _tiny_model(root / "model")
    pa, pb = _port(), _port()
    gateway = (f"threads = {threads}\n" if threads else "") + (
        f"route_cache_s = {route_cache_s}\n" if route_cache_s else ""
    )
    tiny = f'[[models]]\nid = "tiny"\npath = "{model}"\npreload = true\n'
    if pin and len(CORES) < 2:
        raise SystemExit("--pin needs at least two cores")
    gw_cpus, rest = ({CORES[0]}, set(CORES[1:])) if pin else (None, None)
    if pin:
        os.sched_setaffinity(0, rest)  # the clients: with B, away from the gateway
    b = _serve(root / "b", "B", '["cpu"]', pb, tiny, "", gateway, rest)
    peer = f'[[peers]]\nname = "B"\nendpoint = "http://127.0.0.1:{pb}"\n'
    a = _serve(root / "a", "A", "[]", pa, "", peer, gateway, gw_cpus)
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
        _settle([a.pid, b.pid])
        yield url_a, url_b, a.pid
    finally:
        for p in (a, b):
            p.send_signal(signal.SIGTERM)
        for p in (a, b):
            p.wait(20)


def _settle(roots: list[int], quiet: float = 0.05, timeout_s: float = 90.0) -> None:
    """Wait until the leaders' processes, together, use under ``quiet`` of a core for a second:
    once a worker answers, its leader starts a spare worker (Python, torch, the kernels: seconds of
    CPU) that would otherwise share the cores with the first runs measured."""
    deadline = time.monotonic() + timeout_s
    before = sum(_cpu_s(r) for r in roots)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = sum(_cpu_s(r) for r in roots)
        if now - before < quiet:
            return
        before = now


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


def _cpu_s(root: int) -> float:
    """CPU seconds (user + system) used so far by process ``root`` and every process under it."""
    parent, ticks = {}, {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
                parent[int(d)], ticks[int(d)] = int(fields[1]), int(fields[11]) + int(fields[12])
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo += [p for p, pp in parent.items() if pp == pid and p not in tree]
    return sum(ticks.get(p, 0) for p in tree) / os.sysconf("SC_CLK_TCK")


def run(url_a: str, url_b: str, pid_a: int, clients: int, requests: int, tokens: int, stream: bool) -> dict:
    """``requests`` per path in all, shared among the clients; ``pid_a``: A's leader."""
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
    cpu0 = _cpu_s(pid_a)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = times["A"], times["B"]
    return {
        "clients": clients,
        "n": len(a),
        "a_cpu": (_cpu_s(pid_a) - cpu0) / len(a),
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
    p.add_argument(
        "--route-cache-s",
        default="",
        help="comma-separated [gateway] route_cache_s values, one run each (default: the default)",
    )
    p.add_argument("--rounds", type=int, default=1, help="times to run the --route-cache-s list")
    cores = p.add_mutually_exclusive_group()
    cores.add_argument(
        "--pin",
        dest="pin",
        action="store_true",
        default=len(CORES) >= 2,
        help="the gateway (A) on the first core, B and the clients on the others: the gateway as a host "
        "of its own (the default with two cores or more)",
    )
    cores.add_argument(
        "--shared",
        dest="pin",
        action="store_false",
        help="A, B and the clients share every core: the hop then also counts the CPU A takes from B",
    )
    args = p.parse_args()
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    verdicts = []
    for _ in range(args.rounds):
        for cache in args.route_cache_s.split(","):
            print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu}, {os.cpu_count()} cores,", end=" ")
            print(f"load average {os.getloadavg()[0]:.1f}, [gateway] threads {args.threads or 'default'},", end=" ")
            print(f"route_cache_s {cache or 'default'}, {'A pinned apart' if args.pin else 'cores shared'}")
            verdicts += [f"route_cache_s {cache or 'default'}: {v}" for v in measure(args, cache.strip())]
    print("# targets")
    for line in verdicts:
        print(line)


def measure(args: argparse.Namespace, route_cache_s: str) -> list[str]:
    """Print one table per kind of request; return the verdicts on the targets."""
    verdicts = []
    with two_leaders(args.threads, route_cache_s, args.pin) as (url_a, url_b, pid_a):
        with httpx.Client() as http:  # warm both paths: connections, code paths, the peer pool
            for _ in range(20):
                _once(http, url_a, False, args.tokens)
                _once(http, url_b, False, args.tokens)
        for stream, what in ((False, f"whole answer, {args.tokens} tokens"), (True, "first byte, streamed")):
            print(f"# {what}: directly to B vs through A (a gateway), same run")
            print(
                f"{'clients':>7} {'n':>5} {'B p50':>8} {'A p50':>8} {'added':>7} {'B p99':>8} {'A p99':>8} {'added':>7}"
                f" {'A cpu':>7}  target (added p50)"
            )
            for n in (int(x) for x in args.clients.split(",")):
                r = run(url_a, url_b, pid_a, n, args.requests, args.tokens, stream)
                added = (r["a50"] - r["b50"]) * 1e3
                verdict = ""
                if n in TARGETS_MS:
                    met = added < TARGETS_MS[n]
                    verdict = f"  < {TARGETS_MS[n]:g} ms: {'met' if met else 'NOT met'}"
                    verdicts.append(f"{what}, {n} client(s): {added:.1f} ms added at p50{verdict}")
                print(
                    f"{r['clients']:>7} {r['n']:>5} {r['b50'] * 1e3:>6.1f}ms {r['a50'] * 1e3:>6.1f}ms "
                    f"{(r['a50'] - r['b50']) * 1e3:>5.1f}ms {r['b99'] * 1e3:>6.1f}ms {r['a99'] * 1e3:>6.1f}ms "
                    f"{(r['a99'] - r['b99']) * 1e3:>5.1f}ms {r['a_cpu'] * 1e3:>5.2f}ms{verdict}",
                    flush=True,
                )
    return verdicts


if __name__ == "__main__":
    main()

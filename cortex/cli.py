"""`cortex`: serve (leader + workers + HTTP front) and status."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from cortex import __version__
from cortex.api import auth
from cortex.config import Config, ConfigError, HostPort, load, parse_host_port

log = logging.getLogger("cortex")

SHUTDOWN_GRACE_S = 6.0  # the front gets this long to finish; the whole stop stays under 10 s


# gunicorn's gthread worker, answering gunicorn's own errors (400, 431 ...) in JSON (cortex/api/serve.py)
FRONT_WORKER_CLASS = "cortex.api.serve.JsonErrorWorker"

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # cortex.ops.metrics.MULTIPROC_ENV, before prometheus-client loads


def local_host(host: str) -> str:
    """Where this host reaches a server bound to ``host`` (a wildcard bind answers on loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _url(hp: HostPort, path: str) -> str:
    host = local_host(hp.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{hp.port}{path}"


def _start_front(
    cfg: Config, engine_endpoint: str, listen: HostPort, auth_file: str, metrics_dir: str, metrics_url: str | None
) -> subprocess.Popen:
    # peers present the fleet's key: accepted as one more API key, and only when keys are on at all
    # (auth.write_auth_file, which wins once written, says the same)
    peer_digest = [auth.digest(cfg.fleet.peer_key)] if cfg.fleet.peer_key and cfg.gateway.api_keys else []
    settings = {
        "engine": engine_endpoint,
        "leader_pid": os.getpid(),  # a stream fails at once when the leader dies (cortex/api/engine_client.py)
        "event_timeout_s": cfg.engine.step_timeout_s + 30,
        "load_timeout_s": cfg.engine.load_timeout_s + 30,
        "max_body_bytes": cfg.gateway.max_body_mb * 1024 * 1024,
        "node": cfg.node.name,
        "keepalive_s": cfg.gateway.keepalive_s,
        # digests, not keys: the front's environment is readable in /proc by the same user
        "api_key_digests": [auth.digest(k) for k in cfg.gateway.api_keys] + peer_digest,
        "admin_key_digests": [auth.digest(k) for k in cfg.gateway.admin_keys],
        "open_paths": list(cfg.gateway.open_paths),
        "auth_file": auth_file,  # the leader rewrites it on reload; it wins over the two above
        "log_level": cfg.log_level,
        "log_format": cfg.log_format,
        "log_content": cfg.log_content,
        "metrics_url": metrics_url,
        "peer_key_digest": peer_digest[0] if peer_digest else "",
        "connect_timeout_s": cfg.fleet.connect_timeout_s,
        # the Responses API's store, one SQLite file shared by the front's workers (cortex/api/response_store.py)
        "responses_store": str(cfg.node.run_dir / "responses.sqlite3"),
        "responses_store_max": cfg.gateway.responses_store_max,
        "responses_store_ttl_s": cfg.gateway.responses_store_ttl_s,
    }
    # fmt: off
    cmd = [
        sys.executable, "-m", "cortex.api.serve",
        "--bind", str(listen),
        "--workers", str(cfg.gateway.workers),
        "--threads", str(cfg.gateway.threads),
        "--worker-class", FRONT_WORKER_CLASS,
        "--graceful-timeout", str(int(SHUTDOWN_GRACE_S) - 1),
        "--keep-alive", "5",
        "--log-level", "warning",
        "--name", "cortex-front",
    ]
    # fmt: on
    env = {**os.environ, "CORTEX_FRONT": json.dumps(settings), MULTIPROC_ENV: metrics_dir}
    # its own process group: Ctrl-C in a terminal reaches the leader only, which stops the front in order
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, process_group=0)


def _probe(url: str, answered: threading.Event, stopping: threading.Event) -> None:
    """Wait until the API answers HTTP at all (any status: 503 while models load is an answer)."""
    while not stopping.is_set():
        try:
            with urllib.request.urlopen(url, timeout=5):
                pass
        except urllib.error.HTTPError:
            pass
        except OSError:
            time.sleep(0.2)
            continue
        answered.set()
        return


def serve(args: argparse.Namespace) -> int:
    # the leader's metrics stay in its memory; only the front writes multiprocess files (see
    # cortex/ops/metrics.py), so an inherited setting must go before prometheus-client is imported
    os.environ.pop(MULTIPROC_ENV, None)
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"cortex: configuration error: {exc}", file=sys.stderr)
        return 2
    listen = cfg.gateway.listen
    if args.listen:
        try:
            listen = parse_host_port(args.listen)
        except ValueError as exc:
            print(f"cortex: --listen: {exc}", file=sys.stderr)
            return 2
        # the override is the configuration from here on: the fleet tells peers this address
        cfg = dataclasses.replace(cfg, gateway=dataclasses.replace(cfg.gateway, listen=listen))

    from cortex.leader import Leader
    from cortex.ops import logs, metrics
    from cortex.ops.notify import Notifier, status_line

    logs.setup(cfg.log_level, cfg.log_format)
    notifier = Notifier()
    leader = Leader(cfg)
    events = {"signal": None, "reload": False}

    def on_stop_signal(signum, _frame):
        if events["signal"] is not None:  # a second one: stop now, whatever is in flight
            leader.stop()
        events["signal"] = signum
        leader.begin_shutdown()

    def on_hup(_signum, _frame):
        events["reload"] = True  # applied by the loop, not inside a signal handler

    signal.signal(signal.SIGINT, on_stop_signal)
    signal.signal(signal.SIGTERM, on_stop_signal)
    signal.signal(signal.SIGHUP, on_hup)
    log.info("cortex %s on node %s: config %s, devices %s", __version__, cfg.node.name, cfg.file, leader.devices)
    metrics_dir = metrics.prepare_multiproc_dir(cfg.node.run_dir)
    exporter = metrics.Exporter(cfg.gateway.metrics_listen.host, cfg.gateway.metrics_listen.port, metrics_dir)
    metrics_url = _url(cfg.gateway.metrics_listen, "/metrics") if exporter.start() else None
    leader.start()
    front = _start_front(cfg, leader.engine_endpoint, listen, str(leader.auth_file), str(metrics_dir), metrics_url)
    answered = threading.Event()
    threading.Thread(
        target=_probe, args=(_url(listen, "/health"), answered, leader.stopping), daemon=True, name="ready-probe"
    ).start()
    try:
        while not leader.stopping.is_set():
            leader.poll_once()
            notifier.tick()
            if front.poll() is not None:
                log.error("the HTTP front exited (status %s); stopping", front.returncode)
                leader.stop()
                return 1
            if answered.is_set() and not notifier.ready:
                log.info("serving the OpenAI API on http://%s/v1 (health: http://%s/health)", listen, listen)
                notifier.announce_ready(status_line(leader))
            elif notifier.enabled and notifier.ready:
                notifier.status(status_line(leader))
            if events["reload"]:
                events["reload"] = False
                notifier.reloading()
                leader.reload()
                notifier.reloaded(status_line(leader))
            if events["signal"] is not None and not notifier.stopping_sent:
                log.info("%s received: draining, then stopping", signal.Signals(events["signal"]).name)
                notifier.stopping(f"draining {leader.in_flight_count()} request(s)")
    finally:
        t0 = time.monotonic()
        notifier.stopping("stopping")
        if front.poll() is None:
            front.terminate()
        leader.shutdown()
        exporter.stop()
        try:
            front.wait(max(SHUTDOWN_GRACE_S - (time.monotonic() - t0), 0.5))
        except subprocess.TimeoutExpired:
            front.kill()
            front.wait()
        log.info("stopped in %.1fs", time.monotonic() - t0)
    return 0


def status(args: argparse.Namespace) -> int:
    """The fleet as one leader sees it (GET /fleet): nodes, their devices and memory, and where
    every model is. Exit status 0 when every node is up."""
    url = args.endpoint.rstrip("/") + "/fleet"
    key = args.api_key or os.environ.get("CORTEX_API_KEY", "")
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            data = json.load(r)
    except urllib.error.HTTPError as exc:
        print(f"cortex: {url}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:300]}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"cortex: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(render_status(data))
    return 0 if data.get("status") == "ok" else 1


def _mb(n: object) -> str:
    if not isinstance(n, int):
        return "-"
    return f"{n / 2**30:.1f}G" if n >= 2**30 else f"{n / 2**20:.0f}M"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]


def render_status(data: dict) -> str:
    """``cortex status`` as a readable table (``--json`` prints ``data`` itself)."""
    nodes = data.get("nodes", [])
    up = sum(n["up"] for n in nodes)
    lines = [f"fleet via {data.get('node')}: {data.get('status')}  ({up}/{len(nodes)} nodes up)", ""]
    rows = []
    for n in nodes:
        state = "up" if n["up"] else "DOWN"
        state += " (cooling)" if n.get("cooling") else ""
        state += " (draining)" if n.get("draining") else ""
        devices = n.get("devices") or [{}]
        for i, d in enumerate(devices):
            used, budget = d.get("used_bytes"), d.get("budget_bytes")
            memory = f"{_mb(used)}/{_mb(budget)} free {_mb(d.get('free_bytes'))}" if budget is not None else "-"
            req = n.get("requests") or {}
            load = f"{req.get('running', 0)} run, {req.get('waiting', 0)} wait" if i == 0 and n["up"] else ""
            first = i == 0
            rows.append(
                [
                    n["name"] + (" *" if n.get("self") and first else "") if first else "",
                    state if first else "",
                    (n.get("status") or "-") if first else "",
                    d.get("device") or "(gateway)",
                    memory,
                    load,
                    (n.get("error") or "") if first else "",
                ]
            )
    lines += _table(["NODE", "STATE", "HEALTH", "DEVICE", "MEMORY used/budget", "LOAD", "ERROR"], rows)
    lines.append("")
    models = [
        [
            m["id"],
            m["status"],
            ",".join(m["resident_on"]) or "-",
            ",".join(m["loadable_on"]) or "-",
            m.get("alias_for", ""),
        ]
        for m in data.get("models", [])
    ]
    lines += _table(["MODEL", "STATUS", "RESIDENT ON", "LOADABLE ON", "ALIAS FOR"], models)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="cortex", description="Self-hosted LLM inference fleet daemon.")
    p.add_argument("--version", action="version", version=f"cortex {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the leader, its workers and the HTTP API")
    s.add_argument("--config", help="path to cortex.toml (default: the embedded defaults)")
    s.add_argument("--listen", help="override [gateway] listen (host:port)")
    s.set_defaults(func=serve)
    st = sub.add_parser("status", help="show the fleet's health, nodes and models (from any leader)")
    st.add_argument("--endpoint", "-e", default="http://127.0.0.1:31313", help="any leader's API base URL")
    st.add_argument("--api-key", help="a key for that leader when it has API keys (default: $CORTEX_API_KEY)")
    st.add_argument("--json", action="store_true", help="print the JSON of GET /fleet, for scripts")
    st.set_defaults(func=status)
    args = p.parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()

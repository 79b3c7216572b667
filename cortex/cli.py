"""`cortex`: serve (leader + workers + HTTP front) and status."""

from __future__ import annotations

import argparse
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
    settings = {
        "engine": engine_endpoint,
        "event_timeout_s": cfg.engine.step_timeout_s + 30,
        "load_timeout_s": cfg.engine.load_timeout_s + 30,
        "max_body_bytes": cfg.gateway.max_body_mb * 1024 * 1024,
        "node": cfg.node.name,
        "keepalive_s": cfg.gateway.keepalive_s,
        # digests, not keys: the front's environment is readable in /proc by the same user
        "api_key_digests": [auth.digest(k) for k in cfg.gateway.api_keys],
        "admin_key_digests": [auth.digest(k) for k in cfg.gateway.admin_keys],
        "open_paths": list(cfg.gateway.open_paths),
        "auth_file": auth_file,  # the leader rewrites it on reload; it wins over the two above
        "log_level": cfg.log_level,
        "log_format": cfg.log_format,
        "log_content": cfg.log_content,
        "metrics_url": metrics_url,
    }
    # fmt: off
    cmd = [
        sys.executable, "-m", "cortex.api.serve",
        "--bind", str(listen),
        "--workers", str(cfg.gateway.workers),
        "--threads", str(cfg.gateway.threads),
        "--worker-class", "gthread",
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
    url = args.endpoint.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            data = json.load(r)
    except urllib.error.HTTPError as exc:
        data = json.load(exc)
    except OSError as exc:
        print(f"cortex: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
        return 0 if data.get("status") == "ok" else 1
    from cortex.admin_cli import print_health

    print_health(data)
    return 0 if data.get("status") == "ok" else 1


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="cortex", description="Self-hosted LLM inference fleet daemon.")
    p.add_argument("--version", action="version", version=f"cortex {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the leader, its workers and the HTTP API")
    s.add_argument("--config", help="path to cortex.toml (default: the embedded defaults)")
    s.add_argument("--listen", help="override [gateway] listen (host:port)")
    s.set_defaults(func=serve)
    st = sub.add_parser("status", help="show a running leader's health")
    st.add_argument("--endpoint", default="http://127.0.0.1:31313")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=status)
    args = p.parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()

"""`cortex-admin`: steer a running leader over its admin socket (no HTTP, no API key).

The socket (``{run_dir}/admin.sock``) is mode 0600 in a 0700 directory, so only the daemon's user
and root get in. Exit status: 0 done, 1 the daemon refused the command (the reason is printed),
2 the daemon cannot be reached (not running, permission denied, not answering) or bad usage.
"""

from __future__ import annotations

import argparse
import errno
import json
import pwd
import socket
import sys
import time
from pathlib import Path
from typing import Any

SYSTEMD_RUN_DIR = Path("/run/cortex")  # RuntimeDirectory=cortex in systemd/cortex.service
DEFAULT_CONFIG = Path("/etc/cortex/cortex.toml")
MODEL_COMMANDS = ("load", "unload", "pin", "unpin", "evict", "clear-cache")
COMMANDS = ("status", "models", "workers", "peers", "drain", "undrain", "reload", *MODEL_COMMANDS)


class Unreachable(Exception):
    """The daemon cannot be asked at all; the message says why and what to do."""


class Refused(Exception):
    """The daemon answered with a failure."""


def socket_path(args: argparse.Namespace) -> Path:
    """--socket, else --run-dir, else the run_dir of --config (or /etc/cortex/cortex.toml, or the
    embedded defaults), else systemd's /run/cortex: the first of these with a socket in it."""
    if args.socket:
        return Path(args.socket)
    if args.run_dir:
        return Path(args.run_dir) / "admin.sock"
    candidates = []
    from cortex.config import ConfigError, load

    config = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    try:
        candidates.append(load(config).node.run_dir / "admin.sock")
    except ConfigError as exc:
        if args.config:
            raise Unreachable(f"cannot read the configuration: {exc}") from None
    candidates.append(SYSTEMD_RUN_DIR / "admin.sock")
    return next((c for c in candidates if c.exists()), candidates[0])


def _owner(path: Path) -> str:
    for p in (path, path.parent):
        try:
            return pwd.getpwuid(p.stat().st_uid).pw_name
        except (OSError, KeyError):
            continue
    return "the daemon's user"


def check_reachable(path: Path) -> None:
    """A plain connect first: ZeroMQ retries a refused or forbidden ipc connect silently, which
    would turn every one of these into an unexplained timeout."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except FileNotFoundError:
            raise Unreachable(f"cortex is not running: no admin socket at {path}") from None
        except PermissionError:
            raise Unreachable(
                f"permission denied: {path} is accessible to {_owner(path)} only; "
                "run cortex-admin as that user (or root)"
            ) from None
        except ConnectionRefusedError:
            raise Unreachable(f"cortex is not running: nothing listens on {path} (a stale socket)") from None
        except OSError as exc:
            if exc.errno == errno.EACCES:
                raise Unreachable(f"permission denied: {path}") from None
            raise Unreachable(f"cannot connect to {path}: {exc.strerror}") from None


def call(path: Path, command: str, args: dict[str, Any], timeout_s: float) -> dict:
    import zmq

    from rpc.admin import AdminCommand
    from rpc.engine import Answer, Failure
    from rpc.messages import Error
    from rpc.transport import RpcClient, RpcTimeout

    check_reachable(path)
    ctx = zmq.Context()
    client = RpcClient(f"ipc://{path}", ctx)
    try:
        reply = client.call(AdminCommand(command, args), timeout_s)
    except RpcTimeout:
        raise Unreachable(f"cortex did not answer {command!r} within {timeout_s:g}s ({path})") from None
    finally:
        client.close()
        ctx.term()
    if isinstance(reply, Answer):
        return reply.data
    if isinstance(reply, Failure):
        raise Refused(f"{reply.kind}: {reply.message}")
    if isinstance(reply, Error):
        raise Refused(f"{reply.kind}: {reply.message}")
    raise Refused(f"unexpected reply {type(reply).__name__}")


def wait_loaded(path: Path, model: str, timeout_s: float) -> dict:
    """A load runs in the leader's loop; poll until it ends."""
    deadline = time.monotonic() + timeout_s
    while True:
        data = call(path, "models", {}, 10.0)
        alias = data.get("aliases", {}).get(model, model)
        m = next((m for m in data["models"] if m["id"] == alias), None)
        if m is None:
            raise Refused(f"model {model!r} disappeared from the catalogue")
        if m["status"] == "loaded":
            return m
        if m["status"] == "failed":
            raise Refused(f"model_failed: {m['id']}: {m.get('error')}")
        if m["status"] == "unloaded":  # given up: no room for it (the error says what is kept and why)
            raise Refused(f"not_loaded: {m.get('error') or 'the load was given up'}")
        if time.monotonic() > deadline:
            raise Unreachable(f"{m['id']} is still {m['status']} after {timeout_s:g}s")
        time.sleep(0.5)


# -- human output ---------------------------------------------------------------------------------


def print_health(data: dict) -> None:
    """Shared with `cortex status`."""
    print(f"node {data.get('node')}: {data.get('status')}  (uptime {data.get('uptime_s')}s)")
    for w in data.get("workers", []):
        print_worker(w)
    for m in data.get("models", []):
        print_model(m)


def print_worker(w: dict) -> None:
    state = "up" if w["alive"] else "DOWN"
    last = f"  last exit: {w['last_exit']}" if w.get("last_exit") else ""
    print(f"  worker {w['rank']} {w['device']:<8} pid {w['pid']}  {state}  restarts {w['restarts']}{last}")


def print_model(m: dict) -> None:
    where = ",".join(m["devices"]) or "-"
    pin = "  pinned" if m.get("pinned") else ""
    engine = m.get("engine")
    load = f"  running {engine['running']} waiting {engine['waiting']}" if engine else ""
    err = f"  ({m['error']})" if m.get("error") else ""
    print(f"  model {m['id']:<32} {m['status']:<10} {where}{pin}{load}{err}")


def print_human(command: str, data: dict) -> None:
    if command == "status":
        print_health(data)
    elif command == "models":
        for m in data["models"]:
            print_model(m)
        for alias, target in sorted(data.get("aliases", {}).items()):
            print(f"  alias {alias} -> {target}")
    elif command == "workers":
        for w in data["workers"]:
            print_worker(w)
    elif command == "peers":
        if not data["peers"]:
            print("no peers configured")
        for p in data["peers"]:
            print(f"  peer {p['name']:<20} {p['status']:<8} {p['endpoint']}")
    elif command in ("drain", "undrain"):
        state = "draining (new requests get 503)" if data["draining"] else "accepting requests"
        print(f"{state}; {data['in_flight']} request(s) in flight")
    elif command == "reload":
        print(
            f"reloaded: added {data['added'] or '-'}, changed {data['changed'] or '-'}, "
            f"removed {data['removed'] or '-'}; {len(data['unchanged'])} unchanged"
        )
        if data["pending"]:
            print(f"  waiting for in-flight requests before replacing: {', '.join(data['pending'])}")
        if data["restart_required"]:
            print(f"  needs a restart to apply: {', '.join(data['restart_required'])}")
    else:
        print_model(data)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="cortex-admin", description="Steer a running cortex over its admin socket.")
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("model", nargs="?", help=f"the model, for {', '.join(MODEL_COMMANDS)}")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--config", help=f"cortex.toml, to find run_dir (default: {DEFAULT_CONFIG} if present)")
    p.add_argument("--run-dir", help="the daemon's run_dir (overrides --config)")
    p.add_argument("--socket", help="the admin socket itself")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer (default 10)")
    p.add_argument("--load-timeout", type=float, default=900.0, help="seconds to wait for a load (default 900)")
    p.add_argument("--no-wait", action="store_true", help="load: return once the load has started")
    args = p.parse_args(argv)
    if args.command in MODEL_COMMANDS and not args.model:
        p.error(f"{args.command} needs a model")
    sys.exit(run(args))


def run(args: argparse.Namespace) -> int:
    try:
        path = socket_path(args)
        data = call(path, args.command, {"model": args.model} if args.model else {}, args.timeout)
        if args.command == "load" and not args.no_wait:
            data = wait_loaded(path, args.model, args.load_timeout)
    except Unreachable as exc:
        print(f"cortex-admin: {exc}", file=sys.stderr)
        return 2
    except Refused as exc:
        print(f"cortex-admin: {args.command} refused: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print_human(args.command, data)
    return 0


if __name__ == "__main__":
    main()

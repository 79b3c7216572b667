"""cortex.toml and models.toml: read with tomllib into typed, validated objects.

One loader for both files. Every problem (missing file, TOML syntax, unknown key, wrong type,
impossible value) raises ConfigError naming the file, the key and what was expected; ``cortex serve``
prints it and exits with status 2. With no ``--config``, the embedded defaults in ``conf/`` apply.
"""

from __future__ import annotations

import importlib.resources
import os
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE = ("auto", "none", "int8", "int4")  # workers/weights.py QUANTIZE: the same values
STRATEGIES = ("lru", "priority")


class ConfigError(ValueError):
    def __init__(self, file: str | Path, key: str, problem: str):
        self.file, self.key, self.problem = str(file), key, problem
        where = f"{self.file}: {key}: " if key else f"{self.file}: "
        super().__init__(where + problem)


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class NodeConfig:
    name: str
    devices: list[str] | str  # "auto" or an explicit list
    run_dir: Path
    models_config: Path
    memory_budget_mb: int  # per device; 0 = measured by the worker (free VRAM, or available RAM shared)
    threads: int  # torch threads per CPU worker; 0 = torch's default
    memory_headroom_mb: int = 512  # per device, kept free for activations and allocator slack
    drain_timeout_s: float = 30.0  # on SIGTERM, how long in-flight requests may take to finish


@dataclass(frozen=True)
class GatewayConfig:
    listen: HostPort
    metrics_listen: HostPort
    workers: int
    threads: int
    max_body_mb: int
    api_keys: tuple[str, ...]  # from api_keys and api_key_file; empty: no authentication
    open_paths: tuple[str, ...]  # served without a key even when keys are set
    keepalive_s: float  # a stream silent this long (cold load, long prefill) gets a ping
    admin_keys: tuple[str, ...] = ()  # required for the management API (/models...) when any key is set


@dataclass(frozen=True)
class EngineConfig:
    step_timeout_s: float
    load_timeout_s: float
    group_timeout_s: float
    max_waiting: int
    kv_cache_mb: int
    kv_cache_dtype: str  # auto (float16 for float32 models on the CPU, else the model's) | a dtype
    max_batch_tokens: int
    prefill_chunk: int
    max_seqs: int
    queue_timeout_s: float
    max_requests_per_client: int


@dataclass(frozen=True)
class EvictionConfig:
    strategy: str
    defrag_after_cycles: int


@dataclass(frozen=True)
class PeerConfig:
    name: str
    endpoint: str  # base URL of the peer's API, no trailing slash
    api_key: str = ""  # sent to this peer instead of [fleet] peer_key


@dataclass(frozen=True)
class FleetConfig:
    poll_interval_s: float = 2.0  # how often each peer's /health is read
    poll_timeout_s: float = 2.0
    down_after: int = 3  # consecutive failed polls before a peer is marked down
    cooldown_after: int = 3  # failed forwarded requests (within cooldown_s) before a peer is cooled down
    cooldown_s: float = 30.0  # how long a cooled-down peer gets no requests
    connect_timeout_s: float = 2.0  # a forwarded request that cannot connect this fast fails over
    peer_key: str = ""  # the fleet's own credential: sent to peers, accepted from them


@dataclass(frozen=True)
class ModelEntry:
    id: str
    path: Path | None
    source: str | None
    tensor_parallel: int
    devices: list[str] | None
    dtype: str
    residency_priority: int
    pinned: bool
    preload: bool
    max_context: int  # 0 = the model's own
    max_output_tokens: int = 0  # the most tokens one completion may ask for; 0 = whatever the context leaves
    aliases: tuple[str, ...] = ()  # other names clients may use for it
    chat_template: Path | None = None
    quantize: str = "auto"  # weight-only quantized linears on the CPU; see conf/models.toml


@dataclass(frozen=True)
class Catalogue:
    models: list[ModelEntry]
    aliases: dict[str, str]

    def resolve(self, name: str) -> ModelEntry | None:
        name = self.aliases.get(name, name)
        return next((m for m in self.models if m.id == name), None)


@dataclass(frozen=True)
class Config:
    file: Path  # where cortex.toml came from (the embedded one when no --config)
    node: NodeConfig
    gateway: GatewayConfig
    engine: EngineConfig
    eviction: EvictionConfig
    peers: list[PeerConfig]
    catalogue: Catalogue
    log_level: str = "INFO"
    log_format: str = "text"  # text | json (JSON lines)
    log_content: bool = False  # prompts and completions in the request log
    fleet: FleetConfig = FleetConfig()
    extra: dict[str, Any] = field(default_factory=dict)


# -- the schema -----------------------------------------------------------------------------------
# Each key: (python type(s), default or REQUIRED, validator returning an error string or None)

REQUIRED = object()


def _port(v: str) -> str | None:
    try:
        parse_host_port(v)
    except ValueError as exc:
        return str(exc)
    return None


def parse_host_port(v: str) -> HostPort:
    host, sep, port = v.rpartition(":")
    if not sep or not host or (":" in host and not host.startswith("[")):
        raise ValueError(f"expected 'host:port' (IPv6 as '[::1]:port'), got {v!r}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected a port between 1 and 65535, got {port!r}")
    return HostPort(host.strip("[]"), int(port))


def _positive(v: float) -> str | None:
    return None if v > 0 else f"expected a number > 0, got {v}"


def _non_negative(v: int) -> str | None:
    return None if v >= 0 else f"expected an integer >= 0, got {v}"


def _one_of(*options: str) -> Callable[[str], str | None]:
    return lambda v: None if v in options else f"expected one of {', '.join(options)}; got {v!r}"


def _devices(v: Any) -> str | None:
    if v == "auto":
        return None
    if isinstance(v, list) and all(isinstance(d, str) and _device_ok(d) for d in v):
        return None
    return f'expected "auto" or a list like ["cuda:0", "cuda:1"] or ["cpu", "cpu"] ([] = a pure gateway); got {v!r}'


def _device_ok(d: str) -> bool:
    kind, _, idx = d.partition(":")
    has_index = ":" in d
    return kind == "cpu" and not has_index or kind == "cuda" and (not has_index or idx.isdigit())


NODE = {
    "name": (str, "", None),
    "devices": ((str, list), "auto", _devices),
    "run_dir": (str, "", None),
    "models_config": (str, "models.toml", None),
    "memory_budget_mb": (int, 0, _non_negative),
    "memory_headroom_mb": (int, 512, _non_negative),
    "threads": (int, 0, _non_negative),
    "drain_timeout_s": ((int, float), 30.0, _positive),
}
GATEWAY = {
    "listen": (str, "127.0.0.1:31313", _port),
    "metrics_listen": (str, "127.0.0.1:31314", _port),
    "workers": (int, 2, _positive),
    "threads": (int, 16, _positive),
    "max_body_mb": (int, 8, _positive),
    "api_keys": (list, [], lambda v: _strings(v, "API keys")),
    "api_key_file": (str, "", None),
    "open_paths": (list, ["/health", "/metrics"], lambda v: _strings(v, "paths")),
    "keepalive_s": ((int, float), 10.0, _positive),
    "admin_keys": (list, [], lambda v: _strings(v, "admin keys")),
    "admin_key_file": (str, "", None),
}


def _strings(v: list, what: str) -> str | None:
    return None if all(isinstance(x, str) and x for x in v) else f"expected a list of non-empty {what} (strings)"


ENGINE = {
    "step_timeout_s": ((int, float), 120.0, _positive),
    "load_timeout_s": ((int, float), 900.0, _positive),
    "group_timeout_s": ((int, float), 60.0, _positive),
    "max_waiting": (int, 256, _positive),
    "kv_cache_mb": (int, 1024, _positive),
    "kv_cache_dtype": (str, "auto", _one_of("auto", "float32", "float16", "bfloat16")),
    "max_batch_tokens": (int, 512, _positive),
    "prefill_chunk": (int, 256, _positive),
    "max_seqs": (int, 64, _positive),
    "queue_timeout_s": ((int, float), 120.0, _positive),
    "max_requests_per_client": (int, 64, _non_negative),
}
EVICTION = {
    "strategy": (str, "lru", _one_of(*STRATEGIES)),
    "defrag_after_cycles": (int, 50, _non_negative),
}
FLEET = {
    "poll_interval_s": ((int, float), 2.0, _positive),
    "poll_timeout_s": ((int, float), 2.0, _positive),
    "down_after": (int, 3, _positive),
    "cooldown_after": (int, 3, _positive),
    "cooldown_s": ((int, float), 30.0, _positive),
    "connect_timeout_s": ((int, float), 2.0, _positive),
    "peer_key": (str, "", None),
}


def _url(v: str) -> str | None:
    if v.startswith(("http://", "https://")) and len(v.split("://", 1)[1].strip("/")) > 0:
        return None
    return f"expected an http:// or https:// URL like 'http://benjy.internal:31313', got {v!r}"


PEER = {
    "name": (str, REQUIRED, lambda v: None if v.strip() else "expected a non-empty name"),
    "endpoint": (str, REQUIRED, _url),
    "api_key": (str, "", None),
}
LOGGING = {
    "level": (str, "INFO", _one_of("DEBUG", "INFO", "WARNING", "ERROR")),
    "format": (str, "text", _one_of("text", "json")),
    "log_content": (bool, False, None),
}
MODEL = {
    "id": (str, REQUIRED, lambda v: None if v.strip() else "expected a non-empty model id"),
    "path": (str, None, None),
    "source": (str, None, None),
    "tensor_parallel": (int, 1, _positive),
    "devices": (list, None, _devices),
    "dtype": (str, "auto", _one_of(*DTYPES)),
    "residency_priority": (int, 100, None),
    "pinned": (bool, False, None),
    "preload": (bool, False, None),
    "max_context": (int, 0, _non_negative),
    "max_output_tokens": (int, 0, _non_negative),
    "aliases": (list, [], lambda v: _strings(v, "aliases")),
    "chat_template": (str, None, None),  # a Jinja file that replaces the model's own template
    "quantize": (str, "auto", _one_of(*QUANTIZE)),
}


def _section(file: Path, where: str, data: Any, schema: dict) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(file, where, f"expected a table, got {type(data).__name__}")
    unknown = sorted(set(data) - set(schema))
    if unknown:
        raise ConfigError(file, f"{where} {unknown[0]}", f"unknown key (known keys: {', '.join(schema)})")
    out = {}
    for key, (types, default, check) in schema.items():
        label = f"{where} {key}".strip()
        if key not in data:
            if default is REQUIRED:
                raise ConfigError(file, label, "required key is missing")
            out[key] = default
            continue
        value = data[key]
        types = types if isinstance(types, tuple) else (types,)
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            names = " or ".join(_type_name(t) for t in types)
            raise ConfigError(file, label, f"expected {names}, got {_type_name(type(value))} {value!r}")
        problem = check(value) if check else None
        if problem:
            raise ConfigError(file, label, problem)
        out[key] = value
    return out


def _type_name(t: type) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "a list",
        dict: "a table",
    }.get(t, t.__name__)


def _read_toml(file: Path) -> dict[str, Any]:
    try:
        with open(file, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(file, "", "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", f"TOML syntax error: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(file, "", f"not UTF-8 text (byte {exc.start}): TOML files must be UTF-8") from None
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read: {exc.strerror}") from None


def embedded_config_path() -> Path:
    return Path(str(importlib.resources.files("cortex.conf").joinpath("cortex.toml")))


def default_run_dir() -> Path:
    """systemd's RuntimeDirectory= (``$RUNTIME_DIRECTORY``, already ours), else a user's runtime dir."""
    if os.environ.get("RUNTIME_DIRECTORY"):
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "cortex" if base else Path(f"/tmp/cortex-{os.getuid()}")


def _key_file(config: Path, name: str, key: str = "api_key_file") -> tuple[str, ...]:
    """Keys, one per line (blank lines and # comments skipped); relative to the config file."""
    if not name:
        return ()
    path = config.parent / name
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(config, f"[gateway] {key}", f"cannot read {path}: {exc.strerror}") from None
    keys = tuple(ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#"))
    if not keys:
        raise ConfigError(config, f"[gateway] {key}", f"{path} holds no keys")
    return keys


def load(file: str | Path | None = None) -> Config:
    """Load cortex.toml (``file``, or the embedded defaults) and the models.toml it names."""
    # absolute, so paths relative to the config stay right whatever directory a process runs in
    path = Path(file).resolve() if file is not None else embedded_config_path()
    data = _read_toml(path)
    top = {"node", "gateway", "engine", "eviction", "fleet", "peers", "neurons", "logging"}
    unknown = sorted(set(data) - top)
    if unknown:
        raise ConfigError(path, unknown[0], f"unknown section (known: {', '.join(sorted(top))})")
    node = _section(path, "[node]", data.get("node", {}), NODE)
    gw = _section(path, "[gateway]", data.get("gateway", {}), GATEWAY)
    eng = _section(path, "[engine]", data.get("engine", {}), ENGINE)
    ev = _section(path, "[eviction]", data.get("eviction", {}), EVICTION)
    logging_cfg = _section(path, "[logging]", data.get("logging", {}), LOGGING)
    fleet = _section(path, "[fleet]", data.get("fleet", {}), FLEET)
    for key in ("peers", "neurons"):  # [[neurons]]: the upstream name
        if not isinstance(data.get(key, []), list):
            raise ConfigError(path, f"[[{key}]]", "expected an array of tables ([[peers]] entries)")
    peer_list = data.get("peers", []) + data.get("neurons", [])
    peers = [PeerConfig(**_section(path, f"[[peers]] #{i + 1}", p, PEER)) for i, p in enumerate(peer_list)]
    peers = [PeerConfig(p.name, p.endpoint.rstrip("/"), p.api_key) for p in peers]
    names = [p.name for p in peers]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(path, f"[[peers]] {name}", "duplicate peer name")

    models_path = Path(node["models_config"])
    if not models_path.is_absolute():
        models_path = path.parent / models_path
    catalogue = load_catalogue(models_path)

    node_cfg = NodeConfig(
        name=node["name"] or socket.gethostname(),
        devices=node["devices"],
        run_dir=Path(node["run_dir"]) if node["run_dir"] else default_run_dir(),
        models_config=models_path,
        memory_budget_mb=node["memory_budget_mb"],
        threads=node["threads"],
        memory_headroom_mb=node["memory_headroom_mb"],
        drain_timeout_s=float(node["drain_timeout_s"]),
    )
    gateway = GatewayConfig(
        listen=parse_host_port(gw["listen"]),
        metrics_listen=parse_host_port(gw["metrics_listen"]),
        workers=gw["workers"],
        threads=gw["threads"],
        max_body_mb=gw["max_body_mb"],
        api_keys=tuple(gw["api_keys"]) + _key_file(path, gw["api_key_file"]),
        open_paths=tuple(gw["open_paths"]),
        keepalive_s=float(gw["keepalive_s"]),
        admin_keys=tuple(gw["admin_keys"]) + _key_file(path, gw["admin_key_file"], "admin_key_file"),
    )
    if isinstance(node_cfg.devices, list) and node_cfg.devices:  # a gateway ([]) loads nothing itself
        for m in catalogue.models:
            missing = [d for d in m.devices or [] if d not in node_cfg.devices]
            if missing:
                raise ConfigError(
                    models_path, f"[[models]] {m.id} devices", f"{missing} are not among {path} [node] devices"
                )
            if m.tensor_parallel > len(node_cfg.devices):
                raise ConfigError(
                    models_path,
                    f"[[models]] {m.id} tensor_parallel",
                    f"{m.tensor_parallel} is larger than the {len(node_cfg.devices)} device(s) in {path}"
                    f" [node] devices {node_cfg.devices}",
                )
    return Config(
        file=path,
        node=node_cfg,
        gateway=gateway,
        engine=EngineConfig(
            step_timeout_s=float(eng["step_timeout_s"]),
            load_timeout_s=float(eng["load_timeout_s"]),
            group_timeout_s=float(eng["group_timeout_s"]),
            max_waiting=eng["max_waiting"],
            kv_cache_mb=eng["kv_cache_mb"],
            kv_cache_dtype=eng["kv_cache_dtype"],
            max_batch_tokens=eng["max_batch_tokens"],
            prefill_chunk=eng["prefill_chunk"],
            max_seqs=eng["max_seqs"],
            queue_timeout_s=float(eng["queue_timeout_s"]),
            max_requests_per_client=eng["max_requests_per_client"],
        ),
        eviction=EvictionConfig(**ev),
        peers=peers,
        catalogue=catalogue,
        log_level=logging_cfg["level"],
        log_format=logging_cfg["format"],
        log_content=logging_cfg["log_content"],
        fleet=FleetConfig(**{k: float(v) if isinstance(v, int) and k.endswith("_s") else v for k, v in fleet.items()}),
    )


def load_catalogue(path: Path) -> Catalogue:
    data = _read_toml(path)
    unknown = sorted(set(data) - {"models", "aliases"})
    if unknown:
        raise ConfigError(path, unknown[0], "unknown section (known: models, aliases)")
    raw = data.get("models", [])
    if not isinstance(raw, list):
        raise ConfigError(path, "[[models]]", "expected an array of tables")
    models, seen = [], set()
    for i, entry in enumerate(raw):
        m = _section(path, f"[[models]] #{i + 1}", entry, MODEL)
        label = f"[[models]] {m['id']}"
        if m["id"] in seen:
            raise ConfigError(path, f"{label} id", "duplicate model id")
        seen.add(m["id"])
        if (m["path"] is None) == (m["source"] is None):
            raise ConfigError(path, label, "expected exactly one of 'path' or 'source'")
        if m["devices"] is not None and len(m["devices"]) != m["tensor_parallel"]:
            raise ConfigError(
                path,
                f"{label} devices",
                f"expected {m['tensor_parallel']} device(s) (tensor_parallel), got {m['devices']}",
            )
        if m["quantize"] in ("int8", "int4") and any(d != "cpu" for d in m["devices"] or ()):
            raise ConfigError(
                path, f"{label} quantize", f"{m['quantize']!r} runs on the CPU only; devices are {m['devices']}"
            )
        p = Path(m["path"]).expanduser() if m["path"] else None
        if p is not None and not p.is_absolute():
            p = path.parent / p
        template = Path(m["chat_template"]).expanduser() if m["chat_template"] else None
        if template is not None and not template.is_absolute():
            template = path.parent / template
        if template is not None and not template.is_file():
            raise ConfigError(path, f"{label} chat_template", f"{template} is not a file")
        models.append(ModelEntry(**{**m, "path": p, "chat_template": template, "aliases": tuple(m["aliases"])}))
    aliases = data.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise ConfigError(path, "[aliases]", 'expected a table of alias = "model id"')
    for alias, target in aliases.items():
        if target not in seen:
            raise ConfigError(path, f"[aliases] {alias}", f"points at unknown model {target!r}")
    aliases = dict(aliases)
    for m in models:  # a model's own `aliases` list joins the [aliases] table
        for alias in m.aliases:
            if alias in seen or aliases.get(alias, m.id) != m.id:
                raise ConfigError(path, f"[[models]] {m.id} aliases", f"{alias!r} already names another model")
            aliases[alias] = m.id
    return Catalogue(models, aliases)

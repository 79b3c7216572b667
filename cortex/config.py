"""cortex.toml and models.toml: read with tomllib into typed, validated objects.

One loader for both files. Every problem (missing file, TOML syntax, unknown key, wrong type,
impossible value) raises ConfigError naming the file, the key and what was expected; ``cortex serve``
prints it and exits with status 2. With no ``--config``, the embedded defaults in ``conf/`` apply.

Each key is declared once, below, as a field of its table's frozen dataclass: type, default,
constraint and a one-line doc (``max_seqs: int = key(64, "sequences in the running batch", gt=0)``).
Reading and checking (``cortex.config_schema``), the defaults, and docs/configuration.md
(``python -m cortex.config_reference``) all come from those declarations. Relative paths are
relative to the file that holds them.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cortex.config_schema import Check, key, read_table, read_toml
from cortex.config_schema import ConfigError as ConfigError
from cortex.config_schema import HostPort as HostPort
from cortex.config_schema import parse_host_port as parse_host_port

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE = ("auto", "none", "int8", "int4")  # workers/weights.py QUANTIZE: the same values
STRATEGIES = ("lru", "priority")
KV_DTYPES = ("auto", "float32", "float16", "bfloat16")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
TASKS = ("generate", "embed")  # a model serves one: generation endpoints or /v1/embeddings


def _devices(v: Any) -> str | None:
    """a list of cpu, cuda or cuda:N devices; or, in [node], "auto"."""
    if v == "auto":
        return None
    if isinstance(v, list) and all(isinstance(d, str) and _device_ok(d) for d in v):
        return None
    return f'expected "auto" or a list like ["cuda:0", "cuda:1"] or ["cpu", "cpu"] ([] = a pure gateway); got {v!r}'


def _device_ok(d: str) -> bool:
    kind, _, idx = d.partition(":")
    has_index = ":" in d
    return kind == "cpu" and not has_index or kind == "cuda" and (not has_index or idx.isdigit())


def _strings(what: str) -> Check:
    def check(v: list) -> str | None:
        return None if all(isinstance(x, str) and x for x in v) else f"expected a list of non-empty {what} (strings)"

    check.__doc__ = "non-empty strings"
    return check


def _non_empty(what: str) -> Check:
    def check(v: str) -> str | None:
        return None if v.strip() else f"expected a non-empty {what}"

    check.__doc__ = "non-empty"
    return check


def _url(v: str) -> str | None:
    """an http:// or https:// URL"""
    if v.startswith(("http://", "https://")) and len(v.split("://", 1)[1].strip("/")) > 0:
        return None
    return f"expected an http:// or https:// URL like 'http://benjy.internal:31313', got {v!r}"


def embedded_config_path() -> Path:
    return Path(str(importlib.resources.files("cortex.conf").joinpath("cortex.toml")))


def default_run_dir() -> Path:
    """systemd's RuntimeDirectory= (``$RUNTIME_DIRECTORY``, already ours), else a user's runtime dir."""
    if os.environ.get("RUNTIME_DIRECTORY"):
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "cortex" if base else Path(f"/tmp/cortex-{os.getuid()}")


# -- cortex.toml: its tables ----------------------------------------------------------------------


@dataclass(frozen=True)
class NodeConfig:
    """[node]: this machine: its name in the fleet, its devices and their memory."""

    name: str = key(factory=socket.gethostname, doc='this leader\'s name in the fleet; "" = the host name')
    devices: str | list[str] = key("auto", "auto: every GPU, else one CPU; [] = a pure gateway", check=_devices)
    run_dir: Path = key(
        factory=default_run_dir,
        doc='sockets and metric files; "" = $RUNTIME_DIRECTORY, else $XDG_RUNTIME_DIR/cortex, else /tmp/cortex-$UID',
    )
    models_config: Path = key(
        Path("models.toml"), "the model catalogue (models.toml, below); left unset, a pure gateway needs none"
    )
    memory_budget_mb: int = key(0, "per device, for weights + KV; 0 = measured (free VRAM, or RAM shared)", ge=0)
    memory_headroom_mb: int = key(512, "per device, kept free for activations and allocator slack", ge=0)
    threads: int = key(0, "torch threads per CPU worker; 0 = torch's default (all cores)", ge=0)
    spare_workers: bool = key(
        True,
        "keep a spare worker process per device started in advance (imports done, about 230 MB of RAM on the CPU), "
        "so a worker that dies is replaced without waiting for Python and torch to load",
    )
    drain_timeout_s: float = key(30.0, "on SIGTERM, how long in-flight requests get to finish", gt=0)


@dataclass(frozen=True)
class GatewayConfig:
    """[gateway]: the HTTP front (gunicorn processes): its addresses, size and API keys. With no key
    set (here or in a key file) the API is open; clients send one as `Authorization: Bearer` or
    `x-api-key`."""

    listen: HostPort = key(HostPort("127.0.0.1", 31313), "the OpenAI + Anthropic API")
    metrics_listen: HostPort = key(HostPort("127.0.0.1", 31314), "Prometheus /metrics (also on the API port)")
    workers: int = key(2, "gunicorn worker processes", gt=0)
    threads: int = key(128, "threads per gunicorn worker (one per in-flight request; idle connections take none)", gt=0)
    max_body_mb: int = key(8, "larger request bodies get 413", gt=0)
    api_keys: tuple[str, ...] = key((), "API keys clients may send", check=_strings("API keys"))
    api_key_file: str = key(
        "",
        "more API keys, one per line (# comments allowed); they join api_keys. A key may carry limits: "
        "KEY max_concurrent=4 tokens_per_minute=20000 (429 beyond them)",
    )
    open_paths: tuple[str, ...] = key(("/health", "/metrics"), "served without a key", check=_strings("paths"))
    keepalive_s: float = key(10.0, "a stream silent this long (cold load, long prefill) gets a ping", gt=0)
    admin_keys: tuple[str, ...] = key((), "needed by /models... once any key is set", check=_strings("admin keys"))
    admin_key_file: str = key("", "more admin keys, like api_key_file; they join admin_keys")
    responses_store_max: int = key(
        1000, "Responses API: stored responses (previous_response_id, GET); oldest dropped first; 0 = off", ge=0
    )
    responses_store_ttl_s: float = key(3600.0, "Responses API: a stored response is gone after this long", gt=0)
    route_cache_s: float = key(
        0.5,
        "how long the front reuses its leader's answer that a peer serves a model before asking again "
        "(so a model that becomes resident here may still go to the peer this long); 0 = ask every time",
        ge=0,
    )


@dataclass(frozen=True)
class EngineConfig:
    """[engine]: scheduling, batching and the KV cache."""

    step_timeout_s: float = key(120.0, "a worker step slower than this fails its requests (watchdog)", gt=0)
    load_timeout_s: float = key(900.0, "a model load slower than this fails", gt=0)
    group_timeout_s: float = key(60.0, "a tensor-parallel group not formed by then fails its load", gt=0)
    max_waiting: int = key(256, "queued requests per model beyond which new ones get 503", gt=0)
    queue_timeout_s: float = key(120.0, "a request still queued after this gets 503 + Retry-After", gt=0)
    max_requests_per_client: int = key(64, "in flight per API key (else address); more get 429; 0 = off", ge=0)
    kv_cache_mb: int = key(1024, "KV cache per device per model: bounds concurrent tokens", gt=0)
    kv_cache_fill: bool = key(
        True,
        "on a GPU, a model's KV pool grows from kv_cache_mb to what the device has free after its weights, less "
        "[node] memory_headroom_mb (one model fills the GPU; false: several share it); only without memory_budget_mb "
        "and with one worker per GPU; CPU: no effect",
    )
    kv_cache_dtype: str = key("auto", "auto: float16 for float32 models on the CPU, else theirs", choices=KV_DTYPES)
    max_batch_tokens: int = key(512, "tokens per step, all sequences together (decodes first)", gt=0)
    prefill_chunk: int = key(256, "longest prompt piece per step, so decodes never stall long", gt=0)
    step_target_ms: int = key(
        50, "while sequences decode, prompt pieces shrink so a step takes about this long; 0 = off", ge=0
    )
    max_seqs: int = key(64, "sequences in the running batch", gt=0)
    state_checkpoints: int = key(
        16, "hybrid models (Qwen3.5): saved recurrent states for prefix-cache hits; 0 = no prefix cache", ge=0
    )
    cuda_graphs: bool = key(True, "on a GPU, decode steps replay CUDA graphs (one per batch size); CPU: no effect")
    overlap_steps: bool = key(
        True, "send a decode step before the previous one's tokens return: the device never waits for the leader"
    )
    decode_steps: int = key(
        4,
        "while every running sequence decodes and nothing waits, a step runs up to this many forwards back to back "
        "and streams their tokens together: less leader and front work per token; 1 = a token per step",
        ge=1,
    )


@dataclass(frozen=True)
class EvictionConfig:
    """[eviction]: when a model must load and its devices are full, idle models are evicted (never
    pinned ones, never ones with requests in flight or queued); a load that cannot fit even then is
    refused (503, or 507 when the model is larger than the device budget itself)."""

    strategy: str = key("lru", "lru: least recently used first; priority: lowest first", choices=STRATEGIES)
    defrag_after_cycles: int = key(50, "restart an idle worker after this many load/unload cycles; 0 = never", ge=0)


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """[logging]: how the leader and its workers log."""

    # Config inherits these fields: cfg.log_level, cfg.log_format, cfg.log_content

    log_level: str = key("INFO", "leader and worker log level", choices=LOG_LEVELS, name="level")
    log_format: str = key("text", "json: one JSON object per line", choices=LOG_FORMATS, name="format")
    log_content: bool = key(False, "the request log carries prompts and completions (never keys)")


@dataclass(frozen=True)
class FleetConfig:
    """[fleet]: any leader accepts any request. A model resident here is served here; one resident on
    peers goes to the least busy of them; one resident nowhere is cold-loaded on the best node."""

    poll_interval_s: float = key(2.0, "how often each peer's /health is read", gt=0)
    poll_timeout_s: float = key(2.0, "a poll slower than this fails", gt=0)
    down_after: int = key(3, "consecutive failed polls before a peer is marked down", gt=0)
    cooldown_after: int = key(3, "failed forwards (within cooldown_s) before a peer is cooled down", gt=0)
    cooldown_s: float = key(30.0, "how long a cooled-down peer gets no requests", gt=0)
    connect_timeout_s: float = key(2.0, "a forward that cannot connect this fast fails over", gt=0)
    peer_key: str = key("", "the fleet's credential: sent to peers instead of the client's key, accepted from them")


@dataclass(frozen=True)
class PeerConfig:
    """[[peers]]: another leader ([[neurons]] is a synonym). A request is forwarded at most once."""

    name: str = key(doc="its name in status, metrics and logs", check=_non_empty("name"))
    endpoint: str = key(doc="base URL of its API, e.g. http://benjy.internal:31313", check=_url)
    api_key: str = key("", "sent to it instead of [fleet] peer_key")


# cortex.toml's tables, each with the dataclass that declares its keys
SECTIONS = {
    "node": NodeConfig,
    "gateway": GatewayConfig,
    "engine": EngineConfig,
    "eviction": EvictionConfig,
    "logging": LoggingConfig,
    "fleet": FleetConfig,
}


# -- models.toml ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    """[[models]]: one model this node can serve, from exactly one of path or source."""

    id: str = key(doc="the name clients send", check=_non_empty("model id"))
    path: Path | None = key(None, "a Hugging Face directory (safetensors) or a .gguf file")
    source: str | None = key(None, "package:NAME (a .gguf in a Python package), hf:org/name[/file.gguf][@revision]")
    tensor_parallel: int = key(1, "devices one copy of the model spans", gt=0)
    devices: list[str] | None = key(None, "its devices; unset = the first free ones", check=_devices)
    dtype: str = key("auto", "auto: float32 on the CPU, bfloat16 on a GPU", choices=DTYPES)
    residency_priority: int = key(100, 'with strategy = "priority": lower ones are evicted first')
    pinned: bool = key(False, "never evicted")
    preload: bool = key(False, "loaded at start-up, in the background")
    max_context: int = key(0, "prompt + completion tokens; 0 = the model's own limit", ge=0)
    max_output_tokens: int = key(0, "the most tokens one completion may ask for; 0 = no limit", ge=0)
    aliases: tuple[str, ...] = key((), "other names clients may use for it", check=_strings("aliases"))
    chat_template: Path | None = key(None, "a Jinja file that replaces the model's own chat template")
    quantize: str = key(
        "auto",
        "weight-only quantized linears; auto: a GGUF's quantized weights stay so; int8, int4: CPU only",
        choices=QUANTIZE,
    )
    task: str = key(
        "generate",
        "what it serves: generate (chat, completions, messages, responses) or embed (/v1/embeddings only)",
        choices=TASKS,
    )


@dataclass(frozen=True)
class Catalogue:
    models: list[ModelEntry]
    aliases: dict[str, str]

    def resolve(self, name: str) -> ModelEntry | None:
        name = self.aliases.get(name, name)
        return next((m for m in self.models if m.id == name), None)


@dataclass(frozen=True)
class KeyLimit:
    """Limits of one API key, from its line in ``api_key_file``: ``KEY max_concurrent=4
    tokens_per_minute=20000``. 0 = no limit of that kind (``max_concurrent`` then falls back to
    ``[engine] max_requests_per_client``)."""

    max_concurrent: int = 0  # requests in flight at once
    tokens_per_minute: int = 0  # prompt and generated tokens over the last minute

    OPTIONS: ClassVar[tuple[str, ...]] = ("max_concurrent", "tokens_per_minute")


@dataclass(frozen=True)
class Config(LoggingConfig):
    """Both files, loaded; [logging]'s keys are its own (inherited) fields."""

    file: Path  # where cortex.toml came from (the embedded one when no --config)
    node: NodeConfig
    gateway: GatewayConfig
    engine: EngineConfig
    eviction: EvictionConfig
    peers: list[PeerConfig]
    catalogue: Catalogue
    fleet: FleetConfig = FleetConfig()
    key_limits: dict[str, KeyLimit] = field(default_factory=dict)  # API key -> its limits (api_key_file)
    extra: dict[str, Any] = field(default_factory=dict)


# -- the two files --------------------------------------------------------------------------------


def load(file: str | Path | None = None) -> Config:
    """Load cortex.toml (``file``, or the embedded defaults) and the models.toml it names."""
    # absolute, so paths relative to the config stay right whatever directory a process runs in
    path = Path(file).resolve() if file is not None else embedded_config_path()
    data = read_toml(path)
    top = {*SECTIONS, "peers", "neurons"}
    unknown = sorted(set(data) - top)
    if unknown:
        raise ConfigError(path, unknown[0], f"unknown section (known: {', '.join(sorted(top))})")
    tables = {name: read_table(path, f"[{name}]", data.get(name, {}), cls) for name, cls in SECTIONS.items()}
    for array in ("peers", "neurons"):  # [[neurons]]: the upstream name
        if not isinstance(data.get(array, []), list):
            raise ConfigError(path, f"[[{array}]]", "expected an array of tables ([[peers]] entries)")
    peer_list = data.get("peers", []) + data.get("neurons", [])
    peers = [read_table(path, f"[[peers]] #{i + 1}", p, PeerConfig) for i, p in enumerate(peer_list)]
    peers = [dataclasses.replace(p, endpoint=p.endpoint.rstrip("/")) for p in peers]
    names = [p.name for p in peers]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(path, f"[[peers]] {name}", "duplicate peer name")

    node: NodeConfig = tables["node"]
    if node.devices == [] and "models_config" not in data.get("node", {}) and not node.models_config.exists():
        catalogue = Catalogue([], {})  # a pure gateway needs no catalogue of its own: it routes everything
    else:
        catalogue = load_catalogue(node.models_config)
    gw: GatewayConfig = tables["gateway"]
    file_keys, key_limits = _key_file(path, gw.api_key_file, "api_key_file", limits=True)
    tables["gateway"] = dataclasses.replace(
        gw,
        api_keys=gw.api_keys + file_keys,
        admin_keys=gw.admin_keys + _key_file(path, gw.admin_key_file, "admin_key_file")[0],
    )
    if isinstance(node.devices, list) and node.devices:  # a gateway ([]) loads nothing itself
        for m in catalogue.models:
            missing = [d for d in m.devices or [] if d not in node.devices]
            if missing:
                raise ConfigError(
                    node.models_config, f"[[models]] {m.id} devices", f"{missing} are not among {path} [node] devices"
                )
            if m.tensor_parallel > len(node.devices):
                raise ConfigError(
                    node.models_config,
                    f"[[models]] {m.id} tensor_parallel",
                    f"{m.tensor_parallel} is larger than the {len(node.devices)} device(s) in {path}"
                    f" [node] devices {node.devices}",
                )
    # each table but [logging] is the Config field of its name; [logging]'s keys are Config's own
    return Config(
        file=path, peers=peers, catalogue=catalogue, key_limits=key_limits, **vars(tables.pop("logging")), **tables
    )


def _key_file(
    config: Path, name: str, setting: str, limits: bool = False
) -> tuple[tuple[str, ...], dict[str, KeyLimit]]:
    """Keys, one per line (blank lines and # comments skipped), relative to the config file; with
    ``limits``, a key may be followed by its limits: ``KEY max_concurrent=4 tokens_per_minute=20000``."""
    if not name:
        return (), {}
    path = config.parent / name
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(config, f"[gateway] {setting}", f"cannot read {path}: {exc.strerror}") from None
    keys, found = [], {}
    for number, line in enumerate(lines, 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        keys.append(words[0])
        if words[1:] and not limits:
            raise ConfigError(path, f"line {number}", "expected one key per line, nothing after it")
        if words[1:]:
            found[words[0]] = _key_limit(path, number, words[1:])
    if not keys:
        raise ConfigError(config, f"[gateway] {setting}", f"{path} holds no keys")
    return tuple(keys), found


def _key_limit(path: Path, number: int, options: list[str]) -> KeyLimit:
    values = {}
    for option in options:
        name, _, value = option.partition("=")
        if name not in KeyLimit.OPTIONS:
            raise ConfigError(path, f"line {number}", f"unknown limit {name!r} (known: {', '.join(KeyLimit.OPTIONS)})")
        if not value.isdigit() or int(value) <= 0:
            raise ConfigError(path, f"line {number}", f"{name}: expected a positive integer, got {value!r}")
        values[name] = int(value)
    return KeyLimit(**values)


def load_catalogue(path: Path) -> Catalogue:
    data = read_toml(path)
    unknown = sorted(set(data) - {"models", "aliases"})
    if unknown:
        raise ConfigError(path, unknown[0], "unknown section (known: models, aliases)")
    raw = data.get("models", [])
    if not isinstance(raw, list):
        raise ConfigError(path, "[[models]]", "expected an array of tables")
    models: list[ModelEntry] = []
    for i, entry in enumerate(raw):
        m: ModelEntry = read_table(path, f"[[models]] #{i + 1}", entry, ModelEntry)
        label = f"[[models]] {m.id}"
        if any(m.id == seen.id for seen in models):
            raise ConfigError(path, f"{label} id", "duplicate model id")
        if (m.path is None) == (m.source is None):
            raise ConfigError(path, label, "expected exactly one of 'path' or 'source'")
        if m.devices is not None and len(m.devices) != m.tensor_parallel:
            raise ConfigError(
                path, f"{label} devices", f"expected {m.tensor_parallel} device(s) (tensor_parallel), got {m.devices}"
            )
        if m.quantize in ("int8", "int4") and any(d != "cpu" for d in m.devices or ()):
            raise ConfigError(
                path, f"{label} quantize", f"{m.quantize!r} runs on the CPU only; devices are {m.devices}"
            )
        if m.chat_template is not None and not m.chat_template.is_file():
            raise ConfigError(path, f"{label} chat_template", f"{m.chat_template} is not a file")
        models.append(m)
    ids = {m.id for m in models}
    aliases = data.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise ConfigError(path, "[aliases]", 'expected a table of alias = "model id"')
    for alias, target in aliases.items():
        if target not in ids:
            raise ConfigError(path, f"[aliases] {alias}", f"points at unknown model {target!r}")
    aliases = dict(aliases)
    for m in models:  # a model's own `aliases` list joins the [aliases] table
        for alias in m.aliases:
            if alias in ids or aliases.get(alias, m.id) != m.id:
                raise ConfigError(path, f"[[models]] {m.id} aliases", f"{alias!r} already names another model")
            aliases[alias] = m.id
    return Catalogue(models, aliases)

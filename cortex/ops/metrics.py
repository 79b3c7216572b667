"""Every Prometheus metric cortex exports, by name, in one place (documented in docs/metrics.md).

Two kinds of process write metrics:
- the leader measures the engine (tokens, latencies, queues, KV cache, loads, evictions, workers,
  peers, device memory). Its metrics live in its own memory (``LEADER``), so gauges behave as
  gauges (set, labels removed when a model goes) with no multiprocess modes.
- the gunicorn front counts HTTP requests by dialect and status and their end-to-end latency. Its
  metrics use prometheus-client's multiprocess mode: each gunicorn worker writes to files in
  ``PROMETHEUS_MULTIPROC_DIR`` (``{run_dir}/metrics``, wiped when the leader starts) and the
  exporter adds them up. The front writes counters and histograms only, so no gauge needs a
  multiprocess mode and dead workers need no ``mark_process_dead``: their counts rightly stay.

One exporter, a thread in the leader (``serve``), answers ``GET /metrics`` on ``metrics_listen``
with both. Each request is counted once: by the front for requests and their status, by the
leader for the work the engine did.

The leader's gauges are snapshots of its state, which only its loop may read. So that a scrape sees
the state of the moment, not of the last snapshot, the exporter asks the loop for fresh ones
(``SCRAPES``) and waits for its next turn (at most ``SCRAPE_WAIT_S``): the loop pays one integer
comparison per turn, and a refresh only when someone scrapes (besides its own few a second).

Module-level metric objects are the one accepted global mutable state here: they are what
prometheus-client is built around, and their locks make them safe to update from any thread
(``SCRAPES`` goes with them: the one exporter and the one loop of a process meet there).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.registry import Collector

log = logging.getLogger("cortex.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# -- buckets ----------------------------------------------------------------------------------------
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)
RATE_BUCKETS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 250, 500, 1000)
LOAD_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900)

LEADER = CollectorRegistry(auto_describe=True)
FRONT = CollectorRegistry(auto_describe=True)  # only a registry for names; the files are what is exported

# -- the front (multiprocess) -----------------------------------------------------------------------
REQUESTS = Counter(
    "cortex_requests",
    "HTTP generation requests by the model asked for, the node that served it, dialect, endpoint and HTTP status",
    ["model", "node", "dialect", "endpoint", "status"],
    registry=FRONT,
)
REQUEST_DURATION = Histogram(
    "cortex_request_duration_seconds",
    "End-to-end latency of a generation request as the front sees it (to the last byte of a stream)",
    ["model", "dialect", "endpoint"],
    buckets=LATENCY_BUCKETS,
    registry=FRONT,
)

# -- the leader (in process) ------------------------------------------------------------------------
PROMPT_TOKENS = Counter("cortex_prompt_tokens", "Prompt tokens of requests that started", ["model"], registry=LEADER)
GENERATION_TOKENS = Counter("cortex_generation_tokens", "Tokens generated", ["model"], registry=LEADER)
CACHED_TOKENS = Counter(
    "cortex_cached_prompt_tokens", "Prompt tokens whose KV came from the prefix cache", ["model"], registry=LEADER
)
TTFT = Histogram(
    "cortex_time_to_first_token_seconds",
    "From a request reaching the leader to its first generated token",
    ["model"],
    buckets=LATENCY_BUCKETS,
    registry=LEADER,
)
INTER_TOKEN = Histogram(
    "cortex_inter_token_latency_seconds",
    "Time between consecutive tokens of one sequence",
    ["model"],
    buckets=TOKEN_LATENCY_BUCKETS,
    registry=LEADER,
)
QUEUE_TIME = Histogram(
    "cortex_queue_time_seconds",
    "From a request reaching the leader (after any model load) to its first step",
    ["model"],
    buckets=LATENCY_BUCKETS,
    registry=LEADER,
)
TOKENS_PER_SECOND = Histogram(
    "cortex_generation_tokens_per_second",
    "Decode speed of each finished sequence: tokens after the first over the time they took",
    ["model"],
    buckets=RATE_BUCKETS,
    registry=LEADER,
)
E2E_ENGINE = Histogram(
    "cortex_engine_request_duration_seconds",
    "From a request reaching the leader to its end (finished, cancelled or failed), by outcome",
    ["model", "outcome"],
    buckets=LATENCY_BUCKETS,
    registry=LEADER,
)
OVERLAPPED_STEPS = Counter(
    "cortex_overlapped_steps",
    "Decode steps sent before the tokens of the step ahead of them returned ([engine] overlap_steps)",
    ["model"],
    registry=LEADER,
)
RUNNING = Gauge("cortex_running_sequences", "Sequences in the running batch", ["model"], registry=LEADER)
WAITING = Gauge(
    "cortex_waiting_sequences", "Sequences queued, and requests parked for a model load", ["model"], registry=LEADER
)
KV_USAGE = Gauge(
    "cortex_kv_cache_usage_ratio", "Share of the model's KV cache blocks in use", ["model"], registry=LEADER
)
KV_BLOCKS = Gauge("cortex_kv_cache_blocks", "KV cache blocks by state", ["model", "state"], registry=LEADER)
MODEL_LOADS = Counter(
    "cortex_model_loads", "Model loads by outcome (ok, failed)", ["model", "outcome"], registry=LEADER
)
MODEL_LOAD_DURATION = Histogram(
    "cortex_model_load_duration_seconds",
    "Time to load a model, from the decision to load to the last rank's reply (files read included)",
    ["model"],
    buckets=LOAD_BUCKETS,
    registry=LEADER,
)
MODEL_LOADED = Gauge("cortex_model_loaded", "1 while the model is loaded on this node", ["model"], registry=LEADER)
EVICTIONS = Counter(
    "cortex_evictions", "Models unloaded to make room or by an operator, by reason", ["reason"], registry=LEADER
)
DEFRAG_RESTARTS = Counter("cortex_defrag_restarts", "Workers restarted to defragment device memory", registry=LEADER)
LOADS_CANCELLED = Counter(
    "cortex_model_loads_cancelled", "Demand loads stopped because every request waiting for them left", registry=LEADER
)
CANCELLATIONS = Counter(
    "cortex_cancellations",
    "Requests cancelled by their client, by the stage they were in (queue, load, prefill, decode)",
    ["model", "stage"],
    registry=LEADER,
)
WORKER_RESTARTS = Counter(
    "cortex_worker_restarts", "Worker processes restarted after they died", ["rank", "device"], registry=LEADER
)
WORKER_UP = Gauge(
    "cortex_worker_up", "1 while the worker process runs and answers", ["rank", "device"], registry=LEADER
)
PEER_UP = Gauge("cortex_peer_up", "1 while a fleet peer answers its health check", ["peer"], registry=LEADER)
DEVICE_MEMORY = Gauge(
    "cortex_device_memory_bytes",
    "Device memory by kind: budget, used, free, evictable",
    ["rank", "device", "kind"],
    registry=LEADER,
)
DRAINING = Gauge("cortex_draining", "1 while this node refuses new requests (drain or shutdown)", registry=LEADER)
RELOADS = Counter(
    "cortex_config_reloads", "Configuration reloads by result (ok, rejected)", ["result"], registry=LEADER
)
ADMIN_COMMANDS = Counter(
    "cortex_admin_commands", "cortex-admin commands by command and result", ["command", "result"], registry=LEADER
)


class ScrapeSync:
    """A scrape asks the leader's loop for fresh gauges, and waits until the loop has set them.

    The exporter thread calls ``ask``; the loop, once a turn, reads ``asked`` (a plain integer: no
    lock on its side) and, when it has grown, refreshes its gauges and calls ``answered``."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.asked = 0  # scrapes that asked so far
        self._answered = 0  # the latest ``asked`` the loop refreshed for
        self.turned_at = 0.0  # monotonic time of the loop's latest turn (0: no loop, e.g. in tests)

    def ask(self, timeout_s: float) -> bool:
        """Wait until the loop has refreshed the gauges after this call; False if it did not in
        ``timeout_s`` or no loop is turning (the last snapshot is served then)."""
        if time.monotonic() - self.turned_at > LOOP_ALIVE_S:
            return False
        with self._cond:
            self.asked += 1
            ticket = self.asked
            return self._cond.wait_for(lambda: self._answered >= ticket, timeout_s)

    def answered(self, asked: int) -> None:
        with self._cond:
            self._answered = max(self._answered, asked)
            self._cond.notify_all()


SCRAPE_WAIT_S = 0.5  # a scrape waits this long at most for the loop's next turn (it turns every 0.1 s)
LOOP_ALIVE_S = 1.0  # a loop that has not turned for this long is stopping: serve what there is
SCRAPES = ScrapeSync()


def set_peer_up(peer: str, up: bool) -> None:
    """For the fleet poller: one call per health check of a peer."""
    PEER_UP.labels(peer).set(1 if up else 0)


def forget_peer(peer: str) -> None:
    """A peer removed from the configuration stops being reported."""
    _remove(PEER_UP, (peer,))


def forget_model(model: str) -> None:
    """Gauges of a model removed from the catalogue (counters and histograms keep their history)."""
    for gauge in (RUNNING, WAITING, KV_USAGE, MODEL_LOADED):
        _remove(gauge, (model,))
    for state in ("used", "total", "cached"):
        _remove(KV_BLOCKS, (model, state))


def _remove(metric, labels: tuple[str, ...]) -> None:
    with contextlib.suppress(KeyError):  # never set
        metric.remove(*labels)


# -- the exporter -----------------------------------------------------------------------------------


def prepare_multiproc_dir(run_dir: Path) -> Path:
    """A fresh directory for the front's metric files: counts from an earlier run must not add up."""
    path = run_dir / "metrics"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700, parents=True)
    return path


class _Combined(Collector):
    """The leader's own metrics and the sum of the front processes' files, as one exposition."""

    def __init__(self, multiproc_dir: Path | None):
        self.multiproc = None
        if multiproc_dir is not None:
            from prometheus_client.multiprocess import MultiProcessCollector

            self.multiproc = MultiProcessCollector(None, path=str(multiproc_dir))

    def collect(self) -> Iterable:
        SCRAPES.ask(SCRAPE_WAIT_S)  # gauges of this moment, not of the loop's last refresh
        yield from LEADER.collect()
        if self.multiproc is not None:
            yield from self.multiproc.collect()


def exposition_registry(multiproc_dir: Path | None) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Combined(multiproc_dir))
    return reg


class Exporter:
    """``GET /metrics`` on ``metrics_listen``, served by a daemon thread of the leader. It reads only
    metric objects (thread-safe) and files, never leader state."""

    def __init__(self, host: str, port: int, multiproc_dir: Path | None):
        self.host, self.port, self.registry = host, port, exposition_registry(multiproc_dir)
        self.server: WSGIServer | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> bool:
        """False (logged) when the address is taken: metrics are worth a warning, not an outage."""
        from prometheus_client import start_http_server

        try:
            self.server, self.thread = start_http_server(self.port, self.host, registry=self.registry)
        except OSError as exc:
            log.error("metrics not served: cannot listen on %s:%d: %s", self.host, self.port, exc.strerror)
            return False
        log.info("Prometheus metrics on http://%s:%d/metrics", self.host, self.port)
        return True

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

"""Memory accounting and the choice of eviction victims. Pure functions, torch-free.

A model's footprint on each of its ranks is its weights plus its KV pool (and, once loaded, what
its worker reports beside it: a hybrid's state pool, CUDA graphs). Mixture-of-experts
layers count every expert (all are resident, whichever few a token uses): each rank holds every
expert's slice of the intermediate features (workers/arch/moe.py), packed like the other linears
when they are (one packed layer per expert); the routers stay dense. Before the first load the
weights are estimated from the model's shape (dtype, packing); once loaded, the worker's measured
size replaces the estimate. A device's budget is configured, or measured by its worker at start-up;
a headroom stays free for activations and allocator slack. On a GPU the KV pool may grow beyond
[engine] kv_cache_mb to what the device has free after the weights, less the same headroom
(``kv_headroom``; the worker's side is workers/gpu/memory.py): the estimate counts kv_cache_mb (the
least it will be), the worker's ``Loaded`` reply the pool it made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from workers.arch.config import ModelConfig
from workers.sharding import ExpertLayout, HeadLayout

if TYPE_CHECKING:
    from cortex.config import Config

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# packed weight-only linears (workers/quant.py), the native kernels' layout (the larger of the two):
# int4 in blocks of 32 with a float16 scale and offset each; int8 in blocks of 32 with a float16 scale
_PACKED_BYTES = {"int4": 0.5 + 4 / 32, "int8": 1.0 + 2 / 32}


def packing(quantize: str, fmt: str, device: str) -> str:
    """The packing a load will use ("none", "int4", "int8"); mirrors workers.weights.resolve_quantize."""
    if quantize == "auto":
        # a GGUF file's own 4-bit blocks stay packed on the CPU (other quantized types: int8, a bit more)
        return "int4" if fmt == "gguf" and device == "cpu" else "none"
    return quantize


def weight_bytes(cfg: ModelConfig, world_size: int, dtype: str, pack: str = "none") -> int:
    """Estimated bytes of one rank's weights: its share of each attention and MLP projection (every
    expert's, in mixture-of-experts layers), and full copies of the embedding, the output head and
    the routers (replicated on every rank)."""
    layout = HeadLayout.for_rank(cfg, 0, world_size)
    h, d = cfg.hidden_size, cfg.head_dim
    q_rows = 2 if cfg.attn_output_gate else 1  # a gated q_proj yields [query | gate] per head
    attn = h * d * ((q_rows + 1) * layout.q_heads + 2 * layout.kv_heads)  # q and o, k and v
    mlp = 3 * h * layout.inter  # gate, up, down
    routers, experts = _experts(cfg, world_size)
    dense_mlps = cfg.num_layers - cfg.moe_layers
    linear = cfg.kv_layers * attn + cfg.linear_layers * _deltanet(cfg, world_size) + dense_mlps * mlp
    linear += cfg.moe_layers * experts
    embed = cfg.vocab_size * h
    dense = _DTYPE_BYTES[dtype]
    per_linear = _PACKED_BYTES.get(pack, dense)
    # a packed head is int8, tied or not (the embedding stays dense for the lookup)
    head_bytes = _PACKED_BYTES["int8"] if pack in _PACKED_BYTES else (0 if cfg.tie_word_embeddings else dense)
    head = embed * head_bytes
    norms = (2 * cfg.num_layers + 1) * h * dense
    return int(linear * per_linear + (embed + cfg.moe_layers * routers) * dense + head + norms)


def _experts(cfg: ModelConfig, world_size: int) -> tuple[int, int]:
    """Parameters of one rank's mixture-of-experts block, as (always dense: the router and the
    shared expert's gate; linears that may be packed: the routed experts' slices and the shared
    expert's). (0, 0) for a model without experts."""
    if not cfg.moe_layers:
        return 0, 0
    layout, h = ExpertLayout.for_rank(cfg, 0, world_size), cfg.hidden_size
    shared_gate = h if cfg.shared_expert_intermediate_size else 0
    return cfg.num_experts * h + shared_gate, 3 * h * (cfg.num_experts * layout.inter + layout.shared_inter)


def _deltanet(cfg: ModelConfig, world_size: int) -> int:
    """Parameters of one rank's Gated DeltaNet layer (hybrid models): the q/k/v/z, b and a
    projections, the conv, and out_proj (its share of the key and value heads)."""
    k_heads, v_heads = cfg.linear_num_key_heads // world_size, cfg.linear_num_value_heads // world_size
    qkv = 2 * k_heads * cfg.linear_key_head_dim + v_heads * cfg.linear_value_head_dim
    z = v_heads * cfg.linear_value_head_dim
    return cfg.hidden_size * (qkv + 2 * z + 2 * v_heads) + qkv * cfg.linear_conv_kernel


def kv_headroom(cfg: Config, devices: list[str], ranks: list[int]) -> int:
    """``LoadDenseShard.kv_headroom`` for a model placed on ``ranks``: the bytes its workers leave
    free when they size its KV pool from their GPU's free memory, or -1 for exactly kv_cache_mb.
    Only where that free memory is the model's to take: [engine] kv_cache_fill on, GPUs only (a
    CPU's free memory is the host's RAM), no configured budget (the operator gave cortex a share of
    the device, not all of it), and no other worker on the same device (each would see it all)."""
    node = cfg.node
    placed = [devices[r] for r in ranks]
    shared = any(devices.count(d) > 1 for d in placed)
    gpus = all(d.startswith("cuda") for d in placed)
    if not cfg.engine.kv_cache_fill or node.memory_budget_mb or shared or not gpus:
        return -1
    return node.memory_headroom_mb * 2**20


class Pools(Protocol):
    """A worker's ``Loaded`` reply, as far as memory goes."""

    kv_bytes: int
    state_bytes: int
    graph_bytes: int


def pool_bytes(loaded: Pools) -> int:
    """What one rank holds beside its weights: the KV pool, a hybrid's recurrent state pool, and
    the CUDA graphs' static buffers and memory pool (known only once captured, so counted from the
    worker's report, not estimated)."""
    return loaded.kv_bytes + loaded.state_bytes + loaded.graph_bytes


@dataclass(frozen=True)
class Resident:
    """A model holding memory on some ranks, as the eviction choice sees it."""

    id: str
    ranks: tuple[int, ...]
    bytes_per_rank: int
    kept: str | None  # why it may not be evicted now (pinned, busy, loading); None: evictable
    priority: int
    last_used: float


@dataclass(frozen=True)
class Room:
    """The outcome of making room for a model: the victims to unload, or why it cannot fit."""

    victims: tuple[Resident, ...] = ()
    refusal: str | None = None  # set when it cannot fit
    never_fits: bool = False  # the model is larger than the device budget itself


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def order(strategy: str) -> Callable[[Resident], tuple]:
    """Eviction order: LRU first; under "priority", lowest residency_priority first, LRU among equals."""
    if strategy == "priority":
        return lambda r: (r.priority, r.last_used)
    return lambda r: (r.last_used,)


def make_room(
    need: int,
    ranks: Iterable[int],
    free: dict[int, int],
    budget: dict[int, int],
    residents: list[Resident],
    strategy: str,
    priority: int,
) -> Room:
    """Choose victims so that ``need`` bytes fit on every rank of ``ranks``. Several victims are taken
    together when one is not enough; under "priority", nothing of higher priority than the incoming
    model is displaced. Victims are taken only where they help (they hold memory on a short rank)."""
    ranks = list(ranks)
    too_big = [r for r in ranks if need > budget[r]]
    if too_big:
        r = too_big[0]
        return Room(
            refusal=f"needs {mib(need)} per device; rank {r}'s whole budget is {mib(budget[r])}",
            never_fits=True,
        )
    free = dict(free)
    short = lambda: [r for r in ranks if free[r] < need]  # noqa: E731
    allowed = [v for v in residents if v.kept is None and (strategy != "priority" or v.priority <= priority)]
    victims: list[Resident] = []
    for v in sorted(allowed, key=order(strategy)):
        if not short():
            break
        if not set(v.ranks) & set(short()):
            continue
        victims.append(v)
        for r in v.ranks:
            free[r] = free.get(r, 0) + v.bytes_per_rank
    if not short():
        return Room(victims=tuple(victims))
    r = short()[0]
    held = [v for v in residents if r in v.ranks and v not in victims]
    why = ", ".join(_why_kept(v, strategy, priority) for v in held) or "nothing else is resident"
    return Room(
        refusal=f"needs {mib(need)} per device; rank {r} has {mib(free[r])} free "
        f"after every possible eviction (kept: {why})"
    )


def _why_kept(v: Resident, strategy: str, priority: int) -> str:
    if v.kept is not None:
        return f"{v.id}: {v.kept}"
    if strategy == "priority" and v.priority > priority:
        return f"{v.id}: residency_priority {v.priority} > {priority}"
    return v.id

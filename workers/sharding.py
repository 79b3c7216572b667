"""Which part of each weight a tensor-parallel rank holds. Torch-free: the leader checks a split
before it asks any worker to load, and the workers build their layers from the same rules.

Attention is split by heads and the MLP by intermediate features. When a model has fewer KV heads
than ranks, each rank keeps a copy of the one KV head its query heads use (rather than refusing).
Mixture-of-experts MLPs split every expert (and the shared expert) by intermediate features too
(``ExpertLayout``; why: workers/arch/moe.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from rpc.messages import KV_BLOCK_SIZE
from workers.arch.config import ModelConfig


class ShardingError(ValueError):
    """A model that cannot be split across this many ranks."""


@dataclass(frozen=True)
class Shard:
    """The part ``[start, start + length)`` of dimension ``dim`` of a full checkpoint tensor."""

    dim: int
    start: int
    length: int


@dataclass(frozen=True)
class HeadLayout:
    """How attention heads and MLP features are divided among ranks."""

    q_heads: int  # local
    kv_heads: int  # local
    q_start: int
    kv_start: int
    inter: int
    inter_start: int

    @classmethod
    def for_rank(cls, cfg: ModelConfig, rank: int, world_size: int, model_name: str = "model") -> HeadLayout:
        n, r = world_size, rank
        if cfg.num_heads % n:
            raise ShardingError(
                f"{model_name}: num_attention_heads={cfg.num_heads} is not divisible by tensor_parallel={n}"
            )
        if cfg.intermediate_size % n:
            raise ShardingError(
                f"{model_name}: intermediate_size={cfg.intermediate_size} is not divisible by tensor_parallel={n}"
            )
        kv = cfg.num_kv_heads
        if kv >= n:
            if kv % n:
                raise ShardingError(f"{model_name}: num_key_value_heads={kv} is not divisible by tensor_parallel={n}")
            kv_local, kv_start = kv // n, r * (kv // n)
        else:
            # Fewer KV heads than ranks: each rank keeps a copy of the one KV head its q heads use.
            if n % kv:
                raise ShardingError(f"{model_name}: tensor_parallel={n} is not a multiple of num_key_value_heads={kv}")
            kv_local, kv_start = 1, r // (n // kv)
        q_local = cfg.num_heads // n
        inter = cfg.intermediate_size // n
        return cls(q_local, kv_local, r * q_local, kv_start, inter, r * inter)


@dataclass(frozen=True)
class ExpertLayout:
    """Each rank's slice of the intermediate features of every routed expert and of the shared one."""

    inter: int  # local, of each routed expert
    inter_start: int
    shared_inter: int  # local, of the shared expert (0: none)
    shared_start: int

    @classmethod
    def for_rank(cls, cfg: ModelConfig, rank: int, world_size: int, model_name: str = "model") -> ExpertLayout:
        sizes = {"moe_intermediate_size": cfg.moe_intermediate_size}
        sizes["shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
        for key, size in sizes.items():
            if size % world_size:
                raise ShardingError(f"{model_name}: {key}={size} is not divisible by tensor_parallel={world_size}")
        inter, shared = cfg.moe_intermediate_size // world_size, cfg.shared_expert_intermediate_size // world_size
        return cls(inter, rank * inter, shared, rank * shared)


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_block_bytes(cfg: ModelConfig, world_size: int, dtype: str, block_size: int = KV_BLOCK_SIZE) -> int:
    """Bytes one KV block takes on each rank (keys and values of every full-attention layer)."""
    kv_heads = HeadLayout.for_rank(cfg, 0, world_size).kv_heads
    return 2 * cfg.kv_layers * kv_heads * cfg.head_dim * block_size * _DTYPE_BYTES[dtype]


def check_split(cfg: ModelConfig, world_size: int, model_name: str) -> None:
    """Raise ShardingError if ``cfg`` cannot be split across ``world_size`` ranks."""
    HeadLayout.for_rank(cfg, 0, world_size, model_name)
    if cfg.moe_layers:
        ExpertLayout.for_rank(cfg, 0, world_size, model_name)
    hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    if cfg.linear_layers and (hk % world_size or hv % hk):  # as workers.arch.deltanet.LinearLayout splits
        raise ShardingError(
            f"{model_name}: linear_num_key_heads={hk} (value heads {hv}) cannot split across tensor_parallel={world_size}"
        )

"""The size of a model's KV pool on a GPU: what the device has free once the weights are in.

A fixed pool ([engine] kv_cache_mb, 1 GiB by default) holds about 9,000 tokens of a Qwen3-0.6B in
bfloat16: 64 streams of 2,000-token prompts need 14 GiB, and an H100 has 80. So when the leader
asks (``LoadDenseShard.kv_headroom`` >= 0: [engine] kv_cache_fill, one worker on the GPU), the
worker measures the device's free memory after loading the weights and makes the pool as large as
that allows, less:

- the headroom ([node] memory_headroom_mb, the same bytes the leader keeps out of the device's
  budget): the activations of the largest step, the CUDA graphs' memory pool (captured after the
  pool, over it), the allocator's slack;
- what the worker allocates after the pool: the graphs' static buffers (inputs, block tables,
  logits) and their padding block; a hybrid model's recurrent state pool (with graphs, one slot
  more: the padding rows').

Never fewer blocks than the leader asked for (``kv_blocks``: kv_cache_mb). The worker reports the
blocks it made in ``Loaded``; the leader's block manager, its memory books and /health take them
from there. On the CPU, or when the leader sends -1, the pool is exactly ``kv_blocks``.
"""

from __future__ import annotations

import logging

import torch

from rpc.messages import KV_BLOCK_SIZE, LoadDenseShard
from workers.gpu import forced
from workers.gpu.graphs import StaticInputs

log = logging.getLogger("cortex.worker")
META = torch.device("meta")


def block_bytes(model: object, kv_dtype: torch.dtype, block_size: int = KV_BLOCK_SIZE) -> int:
    """Bytes of one KV block of ``model`` (keys and values of every layer), as PagedKVCache holds it."""
    layers, kv_heads, head_dim, _ = model.kv_shape()
    return 2 * layers * block_size * kv_heads * head_dim * kv_dtype.itemsize


def graph_static_bytes(max_seqs: int, max_positions: int, vocab: int, block_size: int = KV_BLOCK_SIZE) -> int:
    """The CUDA graphs' static buffers for a pool larger than one sequence can use: the step's
    inputs with block tables as wide as the model's context, and the float32 logits buffer."""
    max_blocks = -(-max_positions // block_size)
    inputs = StaticInputs.allocate(max_seqs, max(max_blocks, 1), META).nbytes()  # shapes only: no memory
    return inputs + max_seqs * vocab * 4


def state_pool_bytes(model: object, slots: int) -> int:
    """A hybrid model's recurrent state pool for ``slots`` sequences (0 for a plain decoder),
    measured on the meta device: the worker's own allocation, without the memory."""
    if not getattr(model, "recurrent", False):
        return 0
    return model.new_state_pool(max(slots, 1), META).nbytes()


def fit_blocks(free: int, headroom: int, reserved: int, block: int, least: int) -> int:
    """Blocks of ``block`` bytes that fit in ``free`` once ``headroom`` and ``reserved`` are kept
    out; at least ``least``."""
    return max(least, (free - headroom - reserved) // block)


def free_bytes(device: torch.device) -> int:
    """Device memory free now. Blocks the caching allocator holds but no tensor uses (the load's
    transient ones) are handed back first: the driver counts them as taken."""
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def kv_pool_blocks(
    device: torch.device, msg: LoadDenseShard, headroom: int, model: object, kv_dtype: torch.dtype, graphs: bool
) -> int:
    """The KV blocks to allocate for the leader (not counting the graphs' padding block): on a GPU
    with ``headroom`` >= 0 (``msg.kv_headroom``), as many as the free memory allows (at least
    ``msg.kv_blocks``); otherwise ``msg.kv_blocks``. Call it after the weights are loaded."""
    asked = max(msg.kv_blocks, 1)
    if headroom < 0 or (device.type != "cuda" and not forced()):
        return asked
    block, cfg = block_bytes(model, kv_dtype), model.cfg
    after = state_pool_bytes(model, msg.state_slots + graphs)  # with graphs, the padding rows' slot too
    if graphs:  # their buffers, and the padding block the worker adds to the pool
        after += graph_static_bytes(max(msg.max_seqs, 1), cfg.max_position_embeddings, cfg.vocab_size) + block
    free = free_bytes(device)
    blocks = fit_blocks(free, headroom, after, block, asked)
    log.info(
        "KV pool from free device memory: %d blocks of %.2f MiB (%.0f MiB free, %.0f MiB headroom, "
        "%.0f MiB allocated after it; %d asked)",
        blocks, block / 2**20, free / 2**20, headroom / 2**20, after / 2**20, asked,
    )  # fmt: skip
    return blocks

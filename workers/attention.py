"""Attention over the paged KV cache: the new tokens of one step against their cached contexts.

On the CPU, with float32 queries and the native kernels built (workers/kernels/attention.c), every
row of the step is one query against its own context, read through the block tables in place:
decode rows, and each row of a prompt chunk, which attends to the positions up to its own
(causal by construction). Gathering contexts cost about as much as the model's matrix products
for 16 decodes, and for a small chunk late in a long prompt (4 rows at 6,000 tokens: 36 ms of 88
per step for gather and conversion, against 18 ms for the kernel reading in place); for whole
256-token chunks the kernel is as fast as SDPA (1.12 s against 1.26 s at 6,000 tokens, 30 layers).
Elsewhere (CUDA, other dtypes, head sizes the kernel does not take) prompt chunks gather their
context and run PyTorch's ``scaled_dot_product_attention`` one by one (FlashAttention on CUDA).
Decode rows on CUDA run the Triton kernel of workers/gpu/paged_attention.py, which reads the pool
through the block tables like the native one (``CORTEX_GPU_ATTENTION=torch`` turns it off, or a
host without Triton); elsewhere they are one batched SDPA call over the gathered, padded contexts.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from workers import native
from workers.kv_cache import PagedKVCache, StepBatch

GPU_ATTENTION_ENV = "CORTEX_GPU_ATTENTION"  # triton (default) | torch: the decode kernel on CUDA
GPU_ATTENTION_MODES = ("triton", "torch")


def attend(q: torch.Tensor, kv: PagedKVCache, layer: int, batch: StepBatch, native_ok: bool = True) -> torch.Tensor:
    """``q``: [T, Hq, D] (the step's rows, RoPE applied, their K and V already written to ``kv``);
    returns [T, Hq, D]. ``native_ok=False`` forces the PyTorch path (tests compare the two)."""
    gqa = q.shape[1] != kv.k.shape[2]
    scale = q.shape[-1] ** -0.5
    if not batch.prefills and batch.decode_rows is not None and len(batch.decode_rows) == q.shape[0]:
        return _decode(q, kv, layer, batch, scale, gqa, native_ok)  # every row decodes, in order
    kernels = native.for_tensor(q) if native_ok and kv.k.dtype in native.POOL_DTYPES else None
    if kernels is not None:  # every row, prompt chunks included, read in place
        k, v = kv.k_layers[layer], kv.v_layers[layer]
        out = kernels.paged_attention(q, k, v, batch.row_tables, batch.row_lengths, kv.block_size, scale)
        if out is not None:
            return out
    out = torch.empty_like(q)
    for s in batch.prefills:  # several new tokens: causal over the chunk, after any cached prefix
        keys, values = kv.gather(layer, s.blocks)  # [blocks, block_size, kv, hd]
        L, offset = s.length, s.length - s.n
        keys = keys.flatten(0, 1)[:L].transpose(0, 1)[None].to(q.dtype)  # the pool may be narrower
        values = values.flatten(0, 1)[:L].transpose(0, 1)[None].to(q.dtype)
        mask = None
        if offset:  # a cached prefix: row i sees positions up to offset + i
            mask = torch.arange(L, device=q.device)[None, :] <= torch.arange(offset, L, device=q.device)[:, None]
        o = F.scaled_dot_product_attention(
            q[s.start : s.end].transpose(0, 1)[None],
            keys,
            values,
            attn_mask=mask,
            is_causal=offset == 0,
            scale=scale,
            enable_gqa=gqa,
        )
        out[s.start : s.end] = o[0].transpose(0, 1)
    if batch.decode_rows is not None:
        out[batch.decode_rows] = _decode(q[batch.decode_rows], kv, layer, batch, scale, gqa, native_ok)
    return out


def _decode(
    q: torch.Tensor, kv: PagedKVCache, layer: int, batch: StepBatch, scale: float, gqa: bool, native_ok: bool
) -> torch.Tensor:
    """One new token per sequence: [B, Hq, D]."""
    if _use_triton(q):
        return _paged_attention().paged_decode(
            q, kv.k_layers[layer], kv.v_layers[layer], batch.decode_blocks, batch.decode_lengths, kv.block_size, scale
        )
    kernels = native.for_tensor(q) if native_ok and kv.k.dtype in native.POOL_DTYPES else None
    if kernels is not None:
        out = kernels.paged_attention(
            q, kv.k_layers[layer], kv.v_layers[layer], batch.decode_blocks, batch.decode_lengths, kv.block_size, scale
        )
        if out is not None:
            return out
    keys, values = kv.gather(layer, batch.decode_blocks)  # [B, Nmax, block_size, kv, hd]
    keys = keys.flatten(1, 2).permute(0, 2, 1, 3).to(q.dtype)  # [B, kv, Lmax, hd]
    values = values.flatten(1, 2).permute(0, 2, 1, 3).to(q.dtype)
    o = F.scaled_dot_product_attention(
        q[:, :, None, :], keys, values, attn_mask=batch.decode_mask, scale=scale, enable_gqa=gqa
    )
    return o[:, :, 0, :]


def _use_triton(q: torch.Tensor) -> bool:
    """Decode rows on the Triton kernel: CUDA tensors, Triton installed, not switched off."""
    mode = os.environ.get(GPU_ATTENTION_ENV, "triton")
    if mode not in GPU_ATTENTION_MODES:
        raise ValueError(f"{GPU_ATTENTION_ENV}={mode!r}: expected one of {', '.join(GPU_ATTENTION_MODES)}")
    return q.is_cuda and mode == "triton" and _paged_attention() is not None


@functools.cache
def _paged_attention():
    """The Triton module, imported on first CUDA use (importing Triton costs CPU-only workers time)."""
    from workers.gpu import paged_attention

    return paged_attention if paged_attention.available() else None

"""Decode attention on the GPU that reads the paged KV pool through the block tables: no gather.

The pool is workers/kv_cache.py's ``PagedKVCache`` layer view: [num_blocks * block_size, Hkv, D],
slot-major, so position ``p`` of a sequence lives at slot ``table[p // block_size] * block_size +
p % block_size``. One program per (sequence, query head) walks its context a tile of positions at
a time with an online softmax (the flash-decoding recurrence) accumulated in float32, whatever the
pool's dtype (float32, bfloat16, float16). Query heads of a GQA group read the same KV head; the
re-reads hit L2, and each program reads only its own sequence's blocks, where the gather path
copied every context, padded to the longest, before SDPA read it again.

Prompt chunks (prefill and the chunk rows of mixed steps) stay on PyTorch's SDPA, which picks
FlashAttention on CUDA: a chunk is a matrix product over many queries, which SDPA already runs at
speed, and a long prompt's gather is paid once per chunk, not once per generated token.

The kernel is built on first use for the interpreter setting current at that moment (Triton fixes
``TRITON_INTERPRET`` when a function is decorated), so tests can run it on CPU tensors. It calls
only Triton builtins: library helpers such as ``tl.sum`` are themselves decorated when Triton is
imported, and one imported before the interpreter was switched on (transformers imports Triton)
cannot run inside an interpreted kernel; ``tl.reduce`` with the library's own combine functions
computes the same on the GPU and takes the interpreter's NumPy path on the CPU.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU hosts without the test extra: the GPU path reports itself unavailable
    triton = tl = None

TILE_POSITIONS = 64  # context positions per loop iteration (a multiple of the 16-slot block)


def available() -> bool:
    return triton is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _decode_kernel(
    Q,
    K,
    V,
    Out,
    Tables,
    Lengths,
    scale,
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_ob,
    stride_oh,
    stride_tb,
    GROUP: tl.constexpr,
    BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    TILE: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    kv_head = h // GROUP
    length = tl.load(Lengths + b).to(tl.int32)
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32) * scale
    m = tl.full([], float("-inf"), tl.float32)  # running max of the scores
    total = tl.full([], 0.0, tl.float32)  # running sum of exp(score - m)
    acc = tl.full([D_PAD], 0.0, tl.float32)
    for start in range(0, length, TILE):
        pos = start + tl.arange(0, TILE)
        valid = pos < length
        page = tl.load(Tables + b * stride_tb + pos // BLOCK, mask=valid, other=0)
        slot = page.to(tl.int64) * BLOCK + (pos % BLOCK)
        kv_ok = valid[:, None] & d_ok[None, :]
        k = tl.load(K + slot[:, None] * stride_ks + kv_head * stride_kh + d[None, :], mask=kv_ok, other=0.0)
        s = tl.reduce(k.to(tl.float32) * q[None, :], 1, tl.standard._sum_combine)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.reduce(s, 0, tl.standard._elementwise_max))
        alpha = tl.exp(m - m_new)  # rescales what was accumulated under the old max
        p = tl.exp(s - m_new)
        v = tl.load(V + slot[:, None] * stride_vs + kv_head * stride_vh + d[None, :], mask=kv_ok, other=0.0)
        acc = acc * alpha + tl.reduce(p[:, None] * v.to(tl.float32), 0, tl.standard._sum_combine)
        total = total * alpha + tl.reduce(p, 0, tl.standard._sum_combine)
        m = m_new
    out = acc / total
    tl.store(Out + b * stride_ob + h * stride_oh + d, out.to(Out.dtype.element_ty), mask=d_ok)


@functools.cache
def _compiled(interpret: bool):
    """``interpret`` only keys the cache: triton.jit reads TRITON_INTERPRET itself, at this call."""
    return triton.jit(_decode_kernel)


def paged_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """``q``: [B, Hq, D]; pools: [slots, Hkv, D] (one layer); ``block_tables``: [B, max_blocks]
    (padding past a row's length is never read); ``lengths``: [B] context lengths, each >= 1.
    Returns [B, Hq, D] in ``q``'s dtype. No host sync: lengths stay on the device."""
    B, Hq, D = q.shape
    Hkv = k_pool.shape[1]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} KV heads")
    if q.stride(-1) != 1 or k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1:
        raise ValueError("paged_decode needs the head dimension contiguous")
    out = torch.empty_like(q)
    if B == 0:
        return out
    tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    _compiled(interpreting())[(B, Hq)](
        q,
        k_pool,
        v_pool,
        out,
        tables,
        lengths,
        float(scale),
        q.stride(0),
        q.stride(1),
        k_pool.stride(0),
        k_pool.stride(1),
        v_pool.stride(0),
        v_pool.stride(1),
        out.stride(0),
        out.stride(1),
        tables.stride(0),
        GROUP=Hq // Hkv,
        BLOCK=block_size,
        HEAD_DIM=D,
        D_PAD=triton.next_power_of_2(D),
        TILE=max(TILE_POSITIONS, triton.next_power_of_2(block_size)),
    )
    return out


def reference_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """What ``paged_decode`` computes, one sequence at a time in float32 PyTorch: the test oracle."""
    group = q.shape[1] // k_pool.shape[1]
    out = torch.empty_like(q)
    for i, n in enumerate(lengths.tolist()):
        pos = torch.arange(n, device=q.device)
        slots = block_tables[i, pos // block_size].long() * block_size + pos % block_size
        k = k_pool[slots].float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, n, D]
        v = v_pool[slots].float().repeat_interleave(group, dim=1).transpose(0, 1)
        w = torch.softmax((q[i].float()[:, None, :] @ k.transpose(1, 2)) * scale, dim=-1)  # [Hq, 1, n]
        out[i] = (w @ v)[:, 0].to(q.dtype)
    return out

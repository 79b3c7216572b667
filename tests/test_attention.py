"""Attention over the paged KV cache (workers/attention.py): the native decode kernel
(workers/kernels/attention.c) reads keys and values through block tables in place and must give
what PyTorch's attention gives on the gathered contexts, for any mix of context lengths, GQA groups
and head sizes, and the same result for a sequence whatever else is in the batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import needs_native_kernels
from workers import native
from workers.arch.config import ModelConfig
from workers.attention import attend
from workers.kv_cache import BLOCK_SIZE, PagedKVCache, StepBatch

CPU = torch.device("cpu")

pytestmark = needs_native_kernels


def _cache_and_batch(lengths: list[int], kv_heads: int, head_dim: int, seed: int = 0, dtype=torch.float32):
    """A cache full of random keys and values, and a decode step of one token per sequence whose
    blocks are scattered over the pool (shuffled), as a long-running server's are."""
    g = torch.Generator().manual_seed(seed)
    need = sum(-(-n // BLOCK_SIZE) for n in lengths)
    cache = PagedKVCache(1, kv_heads, head_dim, dtype, torch.device("cpu"), need + 3)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g) * 2)
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    free = torch.randperm(need + 3, generator=g).tolist()
    seqs = []
    for n in lengths:
        table = [free.pop() for _ in range(-(-n // BLOCK_SIZE))]
        seqs.append(([7], n - 1, table))
    return cache, StepBatch.build(seqs, BLOCK_SIZE, torch.device("cpu"))


def _reference(q: torch.Tensor, cache: PagedKVCache, batch: StepBatch) -> torch.Tensor:
    """Each sequence alone: its context gathered position by position, plain softmax attention."""
    out = []
    group = q.shape[1] // cache.k.shape[2]
    for i, length in enumerate(batch.decode_lengths.tolist()):
        blocks = batch.decode_blocks[i]
        slots = torch.tensor([int(blocks[p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE for p in range(length)])
        k = cache.k[0, slots].float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
        v = cache.v[0, slots].float().repeat_interleave(group, dim=1).transpose(0, 1)
        w = torch.softmax((q[i, :, None, :] @ k.transpose(1, 2)).double() / q.shape[-1] ** 0.5, dim=-1)
        out.append((w.float() @ v)[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "head_dim"),
    [(9, 3, 64), (4, 4, 128), (16, 2, 72), (8, 1, 80)],
    ids=["smollm2", "mha-128", "gqa8-d72", "mqa-d80"],
)
def test_native_decode_attention_matches_softmax_attention(q_heads, kv_heads, head_dim):
    assert native.kernels() is not None
    lengths = [1, 2, 15, 16, 17, 33, 100, 257]  # within a block, on block edges, across many blocks
    cache, batch = _cache_and_batch(lengths, kv_heads, head_dim)
    q = torch.randn(len(lengths), q_heads, head_dim, generator=torch.Generator().manual_seed(1))
    want = _reference(q, cache, batch)
    got = attend(q, cache, 0, batch)
    via_torch = attend(q, cache, 0, batch, native_ok=False)
    assert (got - want).abs().max() < 1e-5
    assert (via_torch - want).abs().max() < 1e-5


def test_a_sequence_gets_the_same_attention_alone_or_in_a_batch():
    lengths = [5, 130, 47, 16, 200, 1, 64, 90]
    cache, batch = _cache_and_batch(lengths, 3, 64, seed=2)
    q = torch.randn(len(lengths), 9, 64, generator=torch.Generator().manual_seed(3))
    together = attend(q, cache, 0, batch)
    for i in range(len(lengths)):
        alone = StepBatch.build(
            [([7], lengths[i] - 1, batch.decode_blocks[i].tolist())], BLOCK_SIZE, torch.device("cpu")
        )
        assert torch.equal(attend(q[i : i + 1], cache, 0, alone)[0], together[i])


def test_prefill_rows_and_decode_rows_in_one_step():
    """A step with a prompt chunk after a cached prefix and two decoding sequences: each part gets
    causal attention over its own context only."""
    g = torch.Generator().manual_seed(4)
    cache = PagedKVCache(1, 2, 64, torch.float32, torch.device("cpu"), 16)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    seqs = [([1] * 6, 20, [3, 4]), ([2], 40, [5, 6, 7]), ([3], 3, [9])]  # 6 new tokens after 20 cached
    batch = StepBatch.build(seqs, BLOCK_SIZE, torch.device("cpu"))
    q = torch.randn(8, 4, 64, generator=g)
    got = attend(q, cache, 0, batch)
    slots = [3 * 16 + p if p < 16 else 4 * 16 + p - 16 for p in range(26)]
    k = cache.k[0, slots].repeat_interleave(2, dim=1).transpose(0, 1)
    v = cache.v[0, slots].repeat_interleave(2, dim=1).transpose(0, 1)
    causal = torch.arange(26)[None, :] <= torch.arange(20, 26)[:, None]
    want = F.scaled_dot_product_attention(q[:6].transpose(0, 1), k, v, attn_mask=causal).transpose(0, 1)
    assert (got[:6] - want).abs().max() < 1e-5
    assert torch.equal(got[6:], attend(q[6:], cache, 0, StepBatch.build(seqs[1:], BLOCK_SIZE, torch.device("cpu"))))


def test_shapes_the_kernel_does_not_take_fall_back_to_pytorch():
    """A head size that is not a multiple of 8 (no model we know has one) still computes."""
    cache, batch = _cache_and_batch([3, 40], 2, 20)
    q = torch.randn(2, 4, 20)
    assert native.kernels().paged_attention(q, cache.k[0], cache.v[0], batch.decode_blocks,
                                            batch.decode_lengths, BLOCK_SIZE, 0.2) is None  # fmt: skip
    assert (attend(q, cache, 0, batch) - _reference(q, cache, batch)).abs().max() < 1e-5


@pytest.mark.parametrize("head_dim", [64, 48, 128])
def test_native_rope_and_kv_write_match_pytorch(head_dim):
    """The step's RoPE and KV write in one native pass: q as ``apply_rotary`` rotates it, rotated k
    and plain v in each row's slot, other slots untouched."""
    from workers.arch.llama import Rotary, apply_rotary

    g = torch.Generator().manual_seed(head_dim)
    T, hq, hkv = 5, 9, 3
    cfg = ModelConfig.from_hf(
        {"model_type": "llama", "hidden_size": hq * head_dim, "num_attention_heads": hq,
         "num_key_value_heads": hkv, "intermediate_size": 8, "num_hidden_layers": 1, "vocab_size": 8,
         "rope_theta": 10000.0}
    )  # fmt: skip
    cos, sin = Rotary(cfg)(torch.tensor([0, 1, 7, 40, 41]), torch.float32)
    heads = torch.randn(T, hq + 2 * hkv, head_dim, generator=g)
    slots = torch.tensor([3, 17, 8, 30, 31])
    k_pool, v_pool = torch.zeros(32, hkv, head_dim), torch.zeros(32, hkv, head_dim)
    q = native.kernels().rope_store(heads, cos, sin, slots, k_pool, v_pool, hq)
    want = apply_rotary(heads[:, : hq + hkv], cos, sin)
    assert torch.allclose(q, want[:, :hq], atol=1e-5)
    assert torch.allclose(k_pool[slots], want[:, hq:], atol=1e-5)
    assert torch.equal(v_pool[slots], heads[:, hq + hkv :])
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[slots] = False
    assert not k_pool[untouched].any() and not v_pool[untouched].any()


def test_a_float16_pool_is_read_and_written_by_the_same_kernels():
    """kv_cache_dtype = float16 (the CPU default): attention reads the half-precision keys and
    values exactly (as float32 after conversion), and RoPE stores k and v rounded as PyTorch's
    ``.half()`` rounds them."""
    lengths = [1, 17, 100, 257]
    cache, batch = _cache_and_batch(lengths, 3, 64, dtype=torch.float16)
    q = torch.randn(len(lengths), 9, 64, generator=torch.Generator().manual_seed(5))
    want = _reference(q, cache, batch)
    assert (attend(q, cache, 0, batch) - want).abs().max() < 1e-5
    assert (attend(q, cache, 0, batch, native_ok=False) - want).abs().max() < 1e-5

    from workers.arch.llama import Rotary, apply_rotary

    cfg = ModelConfig.from_hf(
        {"model_type": "llama", "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
         "intermediate_size": 8, "num_hidden_layers": 1, "vocab_size": 8}
    )  # fmt: skip
    cos, sin = Rotary(cfg)(torch.tensor([3, 9]), torch.float32)
    heads = torch.randn(2, 15, 64, generator=torch.Generator().manual_seed(6))
    k_pool, v_pool = torch.zeros(8, 3, 64, dtype=torch.float16), torch.zeros(8, 3, 64, dtype=torch.float16)
    native.kernels().rope_store(heads, cos, sin, torch.tensor([2, 5]), k_pool, v_pool, 9)
    # one float16 rounding step at most: the kernel fuses multiply-adds, torch may not
    want = apply_rotary(heads[:, 9:12], cos, sin).half().float()
    torch.testing.assert_close(k_pool[[2, 5]].float(), want, rtol=2**-10, atol=2**-24)
    assert torch.equal(v_pool[[2, 5]], heads[:, 12:].half())


def test_prompt_chunks_read_in_place_match_gathered_attention():
    """Every row of a prompt chunk is one query against the positions up to its own: the native
    kernel reads them through the block table, with or without a cached prefix, beside decodes."""
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float16):
        cache = PagedKVCache(1, 3, 64, dtype, torch.device("cpu"), 40)
        cache.k.copy_(torch.randn(cache.k.shape, generator=g) * 2)
        cache.v.copy_(torch.randn(cache.v.shape, generator=g))
        seqs = [
            ([1] * 37, 0, [11, 2, 30]),  # a first chunk: causal from position 0
            ([2], 40, [5, 6, 7]),  # a decode
            ([3] * 9, 200, [*range(12, 25), 31]),  # a chunk after 200 cached positions, crossing a block
            ([4] * 2, 15, [8, 9]),  # two rows at a block edge
        ]
        batch = StepBatch.build(seqs, BLOCK_SIZE, torch.device("cpu"))
        q = torch.randn(49, 9, 64, generator=g)
        got = attend(q, cache, 0, batch)
        assert "row_tables" in vars(batch)  # the rows went to the kernel, not to SDPA
        want = attend(q, cache, 0, batch, native_ok=False)
        assert (got - want).abs().max() < 1e-5, dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_rows_from_the_cpu_table_are_the_angles_computed_for_each_position(dtype):
    """On the CPU cos and sin come from a table (one gather a step instead of six small ops): the
    same bits as computing them for those positions, when the table is first made, when a position
    passes its end and it grows, and past the model's longest context."""
    from workers.arch.llama import Rotary

    cfg = ModelConfig.from_hf(
        {"model_type": "llama", "hidden_size": 9 * 64, "num_attention_heads": 9, "num_key_value_heads": 3,
         "intermediate_size": 8, "num_hidden_layers": 1, "vocab_size": 8, "rope_theta": 100000.0,
         "max_position_embeddings": 2048}
    )  # fmt: skip
    rotary = Rotary(cfg)
    for positions in ([0], [41], [3, 255, 17], [256], list(range(0, 2100, 13)), [5000, 2]):
        p = torch.tensor(positions)
        got, want = rotary(p, dtype), rotary._angles(p, dtype)
        assert [t.shape for t in got] == [t.shape for t in want] == [(len(positions), 1, 64)] * 2
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), positions
        assert got[0].is_contiguous() and got[1].is_contiguous()
    # past the longest context the table doubles too: the next positions do not rebuild it
    table = rotary.table(5000, dtype)
    assert rotary.table(5001, dtype) is table and table[0].shape[0] == 10002


def test_step_batch_positions_and_slots_follow_each_block_table():
    batch = StepBatch.build([([1, 2, 3], 14, [5, 9]), ([4], 20, [2, 7])], BLOCK_SIZE, CPU)
    assert batch.positions.tolist() == [14, 15, 16, 20]
    assert batch.slots.tolist() == [5 * 16 + 14, 5 * 16 + 15, 9 * 16 + 0, 7 * 16 + 4]
    assert batch.tokens.dtype == batch.positions.dtype == batch.slots.dtype == torch.long
    assert batch.decode_rows.tolist() == [3] and batch.last_rows.tolist() == [2, 3]
    assert batch.decode_blocks.tolist() == [[2, 7]] and batch.decode_lengths.tolist() == [21]


def test_decode_mask_hides_only_the_padding_and_is_none_without_any():
    full = StepBatch.build([([1], 31, [0, 1])], BLOCK_SIZE, CPU)  # 32 positions: both blocks full
    assert full.decode_mask is None
    ragged = StepBatch.build([([1], 2, [3]), ([1], 20, [4, 5])], BLOCK_SIZE, CPU)
    mask = ragged.decode_mask
    assert mask.shape == (2, 1, 1, 32)
    assert mask[0, 0, 0].tolist() == [True] * 3 + [False] * 29
    assert mask[1, 0, 0].tolist() == [True] * 21 + [False] * 11

"""The Triton decode kernel (workers/gpu/paged_attention.py), run on the CPU by Triton's interpreter:
it reads the paged pool through block tables and must give what plain softmax attention over each
sequence's context gives, for GQA groups, head sizes that are not powers of two, lengths that end
mid-block, on block edges and of one position, and float32, bfloat16 and float16 pools. Then the
wiring: ``attend`` routes decode rows to it (on CUDA; forced here) and gives the PyTorch path's
answer, and ``CORTEX_GPU_ATTENTION`` selects or refuses."""

from __future__ import annotations

import pytest
import torch

from workers import attention
from workers.gpu.paged_attention import paged_decode, reference_decode
from workers.kv_cache import PagedKVCache, StepBatch


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """The kernel is built on its first call for the interpreter setting of that moment: set here,
    per test, not for the rest of the run (Triton may have been imported already, by transformers)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# float32 sums in another order; a bfloat16/float16 output is rounded once (8 / 11 bits of mantissa)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _pool(lengths: list[int], kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, seed: int = 0):
    """Random K and V pools and block tables scattered over them (shuffled, as a running server's
    are), padded with block 0 past each row's length."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lengths]
    num_blocks = sum(need) + 2
    k = (torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=g) * 2).to(dtype)
    v = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=g).to(dtype)
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(lengths), max(need), dtype=torch.long)
    for i, n in enumerate(need):
        tables[i, :n] = torch.tensor([free.pop() for _ in range(n)])
    return k, v, tables, torch.tensor(lengths)


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "head_dim", "block_size", "lengths"),
    [
        (4, 4, 64, 16, [1, 16, 17]),  # one position, a block edge, one past it
        (8, 2, 128, 16, [5, 70, 129]),  # GQA 4 (Qwen3 head size), across tiles
        (9, 3, 80, 16, [33, 1]),  # GQA 3, a head size padded to 128 inside the kernel
        (4, 1, 32, 32, [31, 64, 97]),  # MQA, another block size
    ],
    ids=["mha", "gqa4-d128", "gqa3-d80", "mqa-bs32"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_triton_decode_matches_reference(q_heads, kv_heads, head_dim, block_size, lengths, dtype):
    k, v, tables, lens = _pool(lengths, kv_heads, head_dim, block_size, dtype)
    q = torch.randn(len(lengths), q_heads, head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    scale = head_dim**-0.5
    got = paged_decode(q, k, v, tables, lens, block_size, scale)
    want = reference_decode(q, k, v, tables, lens, block_size, scale)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), want.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_one_position_returns_its_value():
    """A context of one position attends to it alone: the output is that value, whatever the score."""
    k, v, tables, lens = _pool([1], 2, 64, 16, torch.float32)
    q = torch.randn(1, 4, 64) * 100
    got = paged_decode(q, k, v, tables, lens, 16, 0.125)
    slot = int(tables[0, 0]) * 16
    torch.testing.assert_close(got[0], v[slot].repeat_interleave(2, dim=0))


def test_rows_are_independent_of_the_batch():
    """A sequence's output does not depend on what else is in the batch (nor on its padding)."""
    k, v, tables, lens = _pool([40, 3, 100], 2, 64, 16, torch.float32)
    q = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(2))
    together = paged_decode(q, k, v, tables, lens, 16, 0.125)
    alone = paged_decode(q[1:2], k, v, tables[1:2, :1], lens[1:2], 16, 0.125)
    torch.testing.assert_close(together[1:2], alone, atol=1e-6, rtol=1e-6)


def test_rejects_heads_that_do_not_group():
    k, v, tables, lens = _pool([4], 3, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        paged_decode(torch.randn(1, 4, 64), k, v, tables, lens, 16, 0.125)


def _decode_step(lengths: list[int], q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(3)
    need = sum(-(-n // 16) for n in lengths)
    cache = PagedKVCache(2, kv_heads, head_dim, dtype, torch.device("cpu"), need + 1)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    free = torch.randperm(need + 1, generator=g).tolist()
    seqs = [([7], n - 1, [free.pop() for _ in range(-(-n // 16))]) for n in lengths]
    q = torch.randn(len(lengths), q_heads, head_dim, generator=g).to(dtype)
    return q, cache, StepBatch.build(seqs, 16, torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_attend_routes_decode_rows_to_triton(monkeypatch, dtype):
    """``attend`` on a decode step: the Triton path (taken on CUDA; forced here on CPU tensors) gives
    the PyTorch path's answer, on the layer it is asked for."""
    q, cache, batch = _decode_step([1, 20, 48], 8, 2, 64, dtype)
    want = attention.attend(q, cache, 1, batch, native_ok=False)
    calls = []
    real = attention._paged_attention().paged_decode
    monkeypatch.setattr(attention, "_use_triton", lambda q: True)
    monkeypatch.setattr(attention._paged_attention(), "paged_decode", lambda *a: calls.append(1) or real(*a))
    got = attention.attend(q, cache, 1, batch, native_ok=False)
    assert calls, "the Triton kernel was not called"
    torch.testing.assert_close(got.float(), want.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_switch_selects_the_kernel_on_cuda_only(monkeypatch):
    cpu = torch.zeros(1, 1, 1)
    monkeypatch.delenv(attention.GPU_ATTENTION_ENV, raising=False)
    assert not attention._use_triton(cpu)  # CPU tensors keep the native / PyTorch paths
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert attention._use_triton(cpu)  # on by default on CUDA
    monkeypatch.setenv(attention.GPU_ATTENTION_ENV, "torch")
    assert not attention._use_triton(cpu)
    monkeypatch.setenv(attention.GPU_ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match="CORTEX_GPU_ATTENTION"):
        attention._use_triton(cpu)


def test_a_padded_graph_step_on_the_triton_kernel_matches_the_ordinary_step(monkeypatch):
    """What a captured decode graph runs on a GPU, run here eagerly: a tiny Qwen3's decode step
    through DecodeGraphs' static, padded buffers with attention on the Triton kernel gives the
    ordinary step's logits (PyTorch attention over StepBatch.build's tables)."""
    from tests.test_gpu_graphs import tiny_model
    from workers.gpu.graphs import DecodeGraphs

    model = tiny_model()
    model.native_decode = False
    cpu = torch.device("cpu")
    prompts, tables = [[5, 9, 1], list(range(3, 23)), [7] * 33], [[0], [1, 2], [3, 4, 5]]
    cache = PagedKVCache(*model.kv_shape()[:3], torch.float32, cpu, 8)
    model(StepBatch.build([(p, 0, t) for p, t in zip(prompts, tables, strict=True)], 16, cpu), cache)
    steps = [(p[-1] + 1, len(p), t) for p, t in zip(prompts, tables, strict=True)]
    want = model(StepBatch.build([([tok], pos, t) for tok, pos, t in steps], 16, cpu), cache)

    monkeypatch.setattr(attention, "_use_triton", lambda q: True)
    got = DecodeGraphs(model, cache, max_batch=4, max_blocks=4, vocab=128, pad_block=7).run(steps)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

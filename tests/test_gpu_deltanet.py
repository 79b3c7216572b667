"""Hybrid (Gated DeltaNet) decode on the GPU path, run on the CPU.

The Triton kernels of workers/gpu/deltanet.py, under Triton's interpreter, must compute what the
PyTorch reference of workers/arch/deltanet.py computes for one token per sequence (the delta rule,
the causal conv1d) and write the new state into each sequence's own slot of the pool, in place,
leaving every other slot as it was: for key heads shared by several value heads, head sizes that
are not powers of two, value widths split over several programs, slots out of order. Then the
graph side: a hybrid decode step through the static buffers of ``DecodeGraphs`` (slot indices
among its inputs, padding rows in a scratch slot; run eagerly here as without CUDA) gives the
ordinary step's logits and states, step after step; and what the graph cannot take runs eagerly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rpc.messages import LoadDenseShard, SamplingParams, SeqInput
from tests.checkpoints import hybrid_randomize, tiny_hybrid_text_config
from workers import native
from workers.arch import ModelConfig, model_class
from workers.arch.deltanet import DepthwiseConv, StateBatch, delta_rule_step, l2_normalize
from workers.gpu import FORCE_ENV, deltanet
from workers.gpu.graphs import DecodeGraphs
from workers.gpu.step import GpuPath, wants_graphs
from workers.kv_cache import PagedKVCache, StepBatch
from workers.sharding import Shard

CPU = torch.device("cpu")
BS = 16


@pytest.fixture
def interpreter(monkeypatch):
    """Kernels are built on first call for the interpreter setting of that moment (see
    tests/test_gpu_kernels.py): set per test."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _delta_inputs(B: int, Hk: int, H: int, dk: int, dv: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = l2_normalize(torch.randn(B, Hk, dk, generator=g)) * dk**-0.5
    k = l2_normalize(torch.randn(B, Hk, dk, generator=g))
    v = torch.randn(B, H, dv, generator=g)
    decay = -torch.rand(B, H, generator=g) * 0.5  # g <= 0, as -exp(A_log) * softplus(...) is
    beta = torch.rand(B, H, generator=g)
    return q, k, v, decay, beta


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize(
    ("Hk", "H", "dk", "dv"),
    [
        (2, 4, 16, 24),  # the tiny hybrid's shape: two value heads per key head, dv not a power of two
        (4, 4, 32, 48),  # one value head per key head (Qwen3.5-0.8B); dv over two column tiles
        (1, 3, 40, 80),  # dk padded to 64 in the kernel, three value heads on one key head, three tiles
    ],
    ids=["gqa2", "mha-tiles", "gqa3-pad"],
)
def test_delta_rule_kernel_updates_the_slots_in_place_as_the_reference(Hk, H, dk, dv):
    slots = torch.tensor([4, 0, 2])  # out of order, slots 1, 3 and 5 not in the step
    pool = torch.randn(6, H, dk, dv, generator=torch.Generator().manual_seed(7))
    want_pool = pool.clone()
    for step in range(3):  # each step starts from the state the previous one wrote
        q, k, v, decay, beta = _delta_inputs(len(slots), Hk, H, dk, dv, seed=step)
        rep = H // Hk
        state = want_pool[slots].clone()
        want, state = delta_rule_step(state, q.repeat_interleave(rep, 1), k.repeat_interleave(rep, 1), v, decay, beta)
        want_pool[slots] = state
        got = deltanet.delta_rule_decode(pool, slots, q, k, v, decay, beta)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pool, want_pool, atol=1e-5, rtol=1e-5)  # the others untouched


@pytest.mark.usefixtures("interpreter")
def test_delta_rule_kernel_takes_repeated_heads_as_the_model_passes_them():
    """The model repeats q and k per value head before the delta rule: the kernel takes that too."""
    q, k, v, decay, beta = _delta_inputs(2, 2, 4, 16, 24, seed=3)
    pool = torch.randn(3, 4, 16, 24)
    twin = pool.clone()
    a = deltanet.delta_rule_decode(pool, torch.tensor([2, 1]), q, k, v, decay, beta)
    b = deltanet.delta_rule_decode(
        twin, torch.tensor([2, 1]), q.repeat_interleave(2, 1), k.repeat_interleave(2, 1), v, decay, beta
    )
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(pool, twin)


def _conv(channels: int, kernel: int, dtype: torch.dtype) -> DepthwiseConv:
    conv = DepthwiseConv([Shard(0, 0, channels)], kernel, dtype)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(channels, 1, kernel, generator=torch.Generator().manual_seed(1)).to(dtype))
    return conv


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize(("channels", "kernel"), [(112, 4), (300, 4), (40, 2)], ids=["one-tile", "tiles", "k2"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["f32", "bf16"])
def test_conv_kernel_shifts_the_slots_in_place_as_the_reference(channels, kernel, dtype, tol):
    """The oracle is the reference in float32 on the same (rounded) values: the kernel sums in
    float32 and rounds once, where the reference's bfloat16 path rounds every product."""
    conv = _conv(channels, kernel, dtype)
    oracle = _conv(channels, kernel, torch.float32)
    oracle.weight.data.copy_(conv.weight)
    slots = [3, 1, 4]
    g = torch.Generator().manual_seed(2)
    pool = torch.randn(5, channels, kernel - 1, generator=g).to(dtype)
    want_pool = pool.to(torch.float32, copy=True)
    seqs = StateBatch.build([1] * len(slots), slots, [False] * len(slots), CPU)
    for _ in range(kernel + 1):  # more steps than the window holds: every held input is replaced
        x = torch.randn(len(slots), channels, generator=g).to(dtype)
        want = oracle(x.float(), want_pool, seqs)
        got = deltanet.conv_decode(x, pool, torch.tensor(slots), conv.weight[:, 0])
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
        assert torch.equal(pool.float(), want_pool)  # held inputs are copied, not computed


def test_the_kernels_run_on_cuda_or_under_the_interpreter_with_the_test_hook(monkeypatch):
    t = torch.zeros(1)
    monkeypatch.delenv(FORCE_ENV, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not deltanet.wanted(t)  # a CPU worker keeps the PyTorch path
    monkeypatch.setenv(FORCE_ENV, "1")
    assert deltanet.wanted(t)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not deltanet.wanted(t)  # Triton cannot compile for the CPU


# -- a hybrid decode step through the graphs' static buffers ------------------------------------------


def tiny_hybrid():
    cfg = ModelConfig.from_hf({**tiny_hybrid_text_config(tied=True), "model_type": "qwen3_5_text"})
    model = model_class(cfg)(cfg, dtype=torch.float32)
    hybrid_randomize(model)
    return model


PROMPTS = [[5, 9, 1], list(range(3, 23)), [7] * 33]
TABLES = [[0], [1, 2], [3, 4, 5]]
SLOTS = [2, 0, 3]  # slot 1 unused; slot 4 is the padding rows' scratch
SCRATCH_BLOCK, SCRATCH_SLOT = 6, 4


def _prefilled(model):
    """The three prompts prefilled in their blocks and slots: a KV pool of 8 blocks, 5 state slots."""
    cache = PagedKVCache(*model.kv_shape()[:3], torch.float32, CPU, 8)
    states = model.new_state_pool(5, CPU)
    batch = StepBatch.build([(p, 0, t) for p, t in zip(PROMPTS, TABLES, strict=True)], BS, CPU)
    model(batch, cache, states, StateBatch.build([len(p) for p in PROMPTS], SLOTS, [True] * 3, CPU))
    return cache, states


def _copy(cache, states, model):
    kv = PagedKVCache(*model.kv_shape()[:3], torch.float32, CPU, cache.num_blocks)
    kv.k.copy_(cache.k)
    kv.v.copy_(cache.v)
    pool = model.new_state_pool(states.num_slots, CPU)
    pool.conv.copy_(states.conv)
    pool.delta.copy_(states.delta)
    return kv, pool


def test_a_padded_hybrid_step_gives_the_ordinary_steps_logits_and_states():
    """Two decode steps of the three sequences, the ordinary way and through the graphs' buffers
    padded to bucket 4: the same logits, the same states in every slot but the scratch one, the
    same KV outside the scratch block."""
    model = tiny_hybrid()
    cache, states = _prefilled(model)
    kv, pool = _copy(cache, states, model)
    graphs = DecodeGraphs(model, cache, max_batch=8, max_blocks=4, vocab=512, pad_block=SCRATCH_BLOCK, states=states)
    assert graphs.pad_slot == SCRATCH_SLOT
    assert graphs.static.state_slots is not None and graphs.static_bytes() == 6 * 8 * 8 + 8 * 4 * 8 + 8 * 512 * 4
    tokens = [p[-1] + 1 for p in PROMPTS]
    for i in range(2):
        steps = [(tok, len(p) + i, t) for tok, p, t in zip(tokens, PROMPTS, TABLES, strict=True)]
        batch = StepBatch.build([([tok], pos, t) for tok, pos, t in steps], BS, CPU)
        want = model(batch, kv, pool, StateBatch.build([1, 1, 1], SLOTS, [False] * 3, CPU))
        got = graphs.run(steps, SLOTS)
        assert graphs.host.state_slots[:4].tolist() == [*SLOTS, SCRATCH_SLOT]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        tokens = want.argmax(-1).tolist()
    real = [s for s in range(5) if s != SCRATCH_SLOT]
    torch.testing.assert_close(states.delta[:, real], pool.delta[:, real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states.conv[:, real], pool.conv[:, real])
    outside = torch.ones(cache.k.shape[1], dtype=torch.bool)
    outside[SCRATCH_BLOCK * BS : (SCRATCH_BLOCK + 1) * BS] = False
    torch.testing.assert_close(cache.k[:, outside], kv.k[:, outside])


def _path(model, cache, states, monkeypatch):
    monkeypatch.setenv(FORCE_ENV, "1")
    msg = LoadDenseShard(model_id="h", format="safetensors", files=[], config={}, dtype="float32", max_seqs=4)
    return GpuPath.build(CPU, msg, model, cache, 512, graphs=True, states=states)


def _seq(i: int, **kw) -> SeqInput:
    fields = dict(tokens=[PROMPTS[i][-1]], start_pos=len(PROMPTS[i]), block_table=TABLES[i], state_slot=SLOTS[i])
    return SeqInput(i, sampling=SamplingParams(temperature=0), **{**fields, **kw})


def test_the_gpu_path_replays_hybrid_decode_rows_and_leaves_the_rest_eager(monkeypatch):
    model = tiny_hybrid()
    cache, states = _prefilled(model)
    path = _path(model, cache, states, monkeypatch)
    assert path.graphs is not None and path.graphs.states is states
    assert path.decode([_seq(0), _seq(2)]).shape == (2, 512)
    for odd in (
        dict(start_pos=0, block_table=[0]),  # a one-token prompt: its slot starts from zero
        dict(state_from=1),  # a saved prefix state to restore first
        dict(state_save=1),  # a state to save after the step
        dict(state_slot=SCRATCH_SLOT),  # not a slot the leader hands out: the eager step refuses it
    ):
        assert path.decode([_seq(0), _seq(1, **odd)]) is None, odd


def test_a_hybrid_model_without_its_state_pool_decodes_eagerly(monkeypatch):
    model = tiny_hybrid()
    cache, _ = _prefilled(model)
    path = _path(model, cache, None, monkeypatch)
    assert path is not None and path.graphs is None and path.decode([_seq(0)]) is None


def test_hybrids_get_graphs_unless_their_experts_route_through_the_host(monkeypatch):
    """A hybrid is captured like a plain decoder; a mixture-of-experts model (Qwen3.5-MoE,
    Qwen3-Next, Qwen3-MoE) is not: its routing reads expert counts back, which capture forbids."""
    monkeypatch.setenv(FORCE_ENV, "1")
    msg = LoadDenseShard(model_id="h", format="safetensors", files=[], config={}, dtype="float32", world_size=2)
    model = tiny_hybrid()
    assert wants_graphs(CPU, msg, model)
    model.cfg = dataclasses.replace(model.cfg, num_experts=8)
    assert not wants_graphs(CPU, msg, model)


def test_the_forced_path_runs_the_kernels_inside_a_hybrid_decode_step(monkeypatch):
    """With the test hook and the interpreter, the model's decode rows take workers/gpu/deltanet.py
    (once per linear layer, conv and delta rule) and give the PyTorch step's logits and states."""
    model = tiny_hybrid()
    cache, states = _prefilled(model)
    kv, pool = _copy(cache, states, model)
    monkeypatch.setenv(FORCE_ENV, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(native, "for_tensor", lambda x: None)  # the CPU's own decode kernel steps aside
    calls = []
    for name in ("delta_rule_decode", "conv_decode"):
        real = getattr(deltanet, name)
        monkeypatch.setattr(deltanet, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    graphs = DecodeGraphs(model, cache, max_batch=8, max_blocks=4, vocab=512, pad_block=SCRATCH_BLOCK, states=states)
    steps = [(p[-1] + 1, len(p), t) for p, t in zip(PROMPTS, TABLES, strict=True)]
    got = graphs.run(steps, SLOTS)
    assert calls.count("delta_rule_decode") == calls.count("conv_decode") == model.cfg.linear_layers
    monkeypatch.delenv(FORCE_ENV)
    batch = StepBatch.build([([tok], pos, t) for tok, pos, t in steps], BS, CPU)
    want = model(batch, kv, pool, StateBatch.build([1, 1, 1], SLOTS, [False] * 3, CPU))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    real = [s for s in range(5) if s != SCRATCH_SLOT]
    torch.testing.assert_close(states.delta[:, real], pool.delta[:, real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states.conv[:, real], pool.conv[:, real])

"""The GPU path wired into the worker (workers/gpu/step.py), proven on the CPU: the test hook
CORTEX_FORCE_GPU_PATH=1 builds it on a CPU worker, where decode steps go through the graphs' padded
static buffers (run eagerly; captured only on CUDA) and sampling through the batch device sampler.
A real Worker is driven with the leader's own requests, as a served one is."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from cortex.config import ConfigError, load
from cortex.models.memory import pool_bytes
from rpc.messages import (
    Error,
    GenerateStep,
    LoadDenseShard,
    Loaded,
    ReleaseSequences,
    SamplingParams,
    SeqInput,
)
from tests.checkpoints import make_checkpoint
from tests.conftest import Server, tiny_models_toml
from workers.arch import ModelConfig
from workers.gpu import FORCE_ENV
from workers.worker import Worker

GREEDY = SamplingParams(temperature=0)
KV_BLOCKS = 32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny-gpu"), "qwen3", tied=True)


def start(ckpt, forced: bool, monkeypatch, **fields) -> tuple[Worker, Loaded]:
    """A CPU worker with the model loaded, the GPU path forced on or not."""
    if forced:
        monkeypatch.setenv(FORCE_ENV, "1")
    else:
        monkeypatch.delenv(FORCE_ENV, raising=False)
    worker, loaded = load_on(ckpt, "cpu", "float32", **fields)
    monkeypatch.delenv(FORCE_ENV, raising=False)  # the path is chosen at load: later steps keep it
    return worker, loaded


def load_on(ckpt, device: str, dtype: str, **fields) -> tuple[Worker, Loaded]:
    """A worker on ``device`` with the tiny model loaded through ``LoadDenseShard``."""
    worker = Worker(device)
    loaded = worker.handle(
        LoadDenseShard(
            model_id="m",
            format="safetensors",
            files=[str(p) for p in sorted(ckpt.glob("*.safetensors"))],
            config=ModelConfig.from_hf_dir(ckpt).to_dict(),
            dtype=dtype,
            kv_blocks=KV_BLOCKS,
            **fields,
        )
    )
    assert isinstance(loaded, Loaded), loaded
    return worker, loaded


def rows_seen(worker: Worker) -> list[int]:
    """The batch size of every forward the model runs from now on (padded rows included)."""
    seen: list[int] = []
    worker.models["m"].model.register_forward_hook(lambda _m, _a, logits: seen.append(logits.shape[0]))
    return seen


def prompts(n: int) -> list[list[int]]:
    """``n`` prompts of 5, 12, 19, ... tokens; the i-th is the same whatever ``n``."""
    return [torch.randint(3, 500, (5 + 7 * i,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(n)]


def table(i: int) -> list[int]:
    return list(range(4 * i, 4 * i + 4))  # 64 positions per sequence


def step(worker: Worker, seqs: list[SeqInput]) -> list[int]:
    reply = worker.handle(GenerateStep("m", seqs))
    assert not isinstance(reply, Error), reply
    assert reply.errors is None, reply.errors
    return reply.tokens


def generate(worker: Worker, n: int, steps: int, params: SamplingParams = GREEDY, first_id: int = 0) -> list[list]:
    """Prefill ``n`` prompts in one step, then decode ``steps`` tokens each: every step's tokens."""
    ps = prompts(n)
    out = [step(worker, [SeqInput(first_id + i, p, 0, params, table(i)) for i, p in enumerate(ps)])]
    for k in range(steps):
        seqs = [SeqInput(first_id + i, [out[-1][i]], len(p) + k, params, table(i)) for i, p in enumerate(ps)]
        out.append(step(worker, seqs))
    return out


@pytest.mark.parametrize(("n", "bucket"), [(1, 1), (3, 4), (5, 8)])
def test_forced_path_decodes_the_greedy_tokens_of_the_cpu_path(ckpt, monkeypatch, n, bucket):
    """Decode steps run padded to their bucket (the forward sees ``bucket`` rows), the prefill
    eagerly, and every token equals the ordinary CPU path's."""
    cpu, _ = start(ckpt, False, monkeypatch)
    want = generate(cpu, n, steps=6)
    gpu, _ = start(ckpt, True, monkeypatch)
    seen = rows_seen(gpu)
    assert generate(gpu, n, steps=6) == want
    assert seen == [n] + [bucket] * 6


def test_a_mixed_step_runs_eagerly(ckpt, monkeypatch):
    """A step with a prompt piece beside decodes is not a graph's: it runs unpadded, eagerly."""
    worker, _ = start(ckpt, True, monkeypatch)
    seen = rows_seen(worker)
    a, b, c = prompts(3)
    first = step(worker, [SeqInput(0, a, 0, GREEDY, table(0)), SeqInput(1, b, 0, GREEDY, table(1))])
    decodes = [SeqInput(i, [first[i]], len(p), GREEDY, table(i)) for i, p in enumerate((a, b))]
    step(worker, [*decodes, SeqInput(2, c, 0, GREEDY, table(2))])
    assert seen == [2, 3]  # three rows, not bucket 4's padded four: run eagerly
    assert worker.models["m"].gpu.decode([*decodes, SeqInput(2, c, 0, GREEDY, table(2))]) is None


def test_the_cpu_path_is_untouched_by_default(ckpt, monkeypatch):
    worker, loaded = start(ckpt, False, monkeypatch)
    assert worker.models["m"].gpu is None
    assert (loaded.kv_blocks, loaded.graph_bytes) == (KV_BLOCKS, 0)
    assert worker.models["m"].cache.num_blocks == KV_BLOCKS


def test_loaded_reports_the_graphs_reserved_bytes_and_keeps_the_padding_block(ckpt, monkeypatch):
    worker, loaded = start(ckpt, True, monkeypatch, max_seqs=8)
    rm = worker.models["m"]
    assert rm.gpu.graphs.buckets == (1, 2, 4, 8)
    # static buffers: five [8] int64 vectors, [8, 32] block tables (2048 positions, but only 32 blocks
    # exist), [8, 512] fp32 logits; no pool without CUDA
    assert loaded.graph_bytes == 5 * 8 * 8 + 8 * 32 * 8 + 8 * 512 * 4 == rm.gpu.reserved_bytes()
    assert loaded.kv_blocks == KV_BLOCKS  # what the leader may hand out ...
    assert rm.cache.num_blocks == KV_BLOCKS + 1 and rm.gpu.graphs.pad_block == KV_BLOCKS  # ... plus the padding's
    assert loaded.kv_bytes == rm.cache.nbytes()
    assert pool_bytes(loaded) == loaded.kv_bytes + loaded.graph_bytes


def test_the_switch_off_keeps_the_device_sampler_without_graphs(ckpt, monkeypatch):
    worker, loaded = start(ckpt, True, monkeypatch, cuda_graphs=False)
    rm = worker.models["m"]
    assert rm.gpu.graphs is None and rm.gpu.sampler is not None
    assert (loaded.graph_bytes, rm.cache.num_blocks) == (0, KV_BLOCKS)
    seen = rows_seen(worker)
    generate(worker, 3, steps=2)
    assert seen == [3, 3, 3]  # every step eager, unpadded


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(ckpt, monkeypatch):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    worker, _ = start(ckpt, True, monkeypatch)
    alone = [s[0] for s in generate(worker, 1, steps=6, params=seeded)]
    worker.handle(ReleaseSequences("m", None))
    together = [s[0] for s in generate(worker, 3, steps=6, params=seeded, first_id=10)]
    assert together == alone
    other = SamplingParams(temperature=1.0, top_p=0.9, seed=8)
    worker.handle(ReleaseSequences("m", None))
    assert [s[0] for s in generate(worker, 1, steps=6, params=other, first_id=20)] != alone


def test_sampler_state_lives_until_the_sequence_is_freed(ckpt, monkeypatch):
    """Penalties keep output counts and a prompt mask on the device, bias a row: all of it per
    sequence, dropped by ReleaseSequences."""
    params = SamplingParams(temperature=0, repetition_penalty=1.3, frequency_penalty=0.5, logit_bias={7: 1.0})
    worker, _ = start(ckpt, True, monkeypatch)
    ps = prompts(2)
    seqs = [SeqInput(i, p, 0, params, table(i), prompt=p) for i, p in enumerate(ps)]
    first = step(worker, seqs)
    step(worker, [SeqInput(i, [first[i]], len(p), params, table(i)) for i, p in enumerate(ps)])
    sampler = worker.models["m"].gpu.sampler
    assert sorted(sampler.seqs) == [0, 1]
    state = sampler.seqs[0]
    assert state.step == 2 and state.counts.sum().item() == 2 and state.counts[first[0]].item() >= 1
    assert state.prompt_mask[ps[0]].all() and state.bias[7].item() == 1.0
    worker.handle(ReleaseSequences("m", [0]))
    assert sorted(sampler.seqs) == [1]
    worker.handle(ReleaseSequences("m", None))
    assert sampler.seqs == {}


def test_penalties_choose_the_host_samplers_greedy_tokens(ckpt, monkeypatch):
    """Greedy with bias and penalties: the device sampler applies them as the host one does."""
    params = SamplingParams(temperature=0, repetition_penalty=1.5, presence_penalty=0.8, logit_bias={9: 2.0})
    runs = []
    for forced in (False, True):
        worker, _ = start(ckpt, forced, monkeypatch)
        ps = prompts(3)
        out = [step(worker, [SeqInput(i, p, 0, params, table(i), prompt=p) for i, p in enumerate(ps)])]
        for k in range(5):
            out.append(
                step(worker, [SeqInput(i, [out[-1][i]], len(p) + k, params, table(i)) for i, p in enumerate(ps)])
            )
        runs.append(out)
    assert runs[0] == runs[1]


def test_logprobs_cross_in_the_same_shape_as_the_host_samplers(ckpt, monkeypatch):
    params = [
        SamplingParams(temperature=0, logprobs=3),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, logprobs=0),
    ]
    replies = []
    for forced in (False, True):
        worker, _ = start(ckpt, forced, monkeypatch)
        seqs = [SeqInput(i, p, 0, params[i], table(i)) for i, p in enumerate(prompts(3))]
        replies.append(worker.handle(GenerateStep("m", seqs)))
    host, device = replies
    assert device.tokens == host.tokens
    assert device.logprobs[1] is None and device.logprobs[2][1] == []
    for got, want in ((device.logprobs[0], host.logprobs[0]), (device.logprobs[2], host.logprobs[2])):
        assert got[0] == pytest.approx(want[0], abs=1e-4)
        assert [i for i, _ in got[1]] == [i for i, _ in want[1]]
        assert [v for _, v in got[1]] == pytest.approx([v for _, v in want[1]], abs=1e-4)


# -- the config switch, from cortex.toml to the worker and back into the memory budget ------------------


def test_the_cuda_graphs_key_is_a_boolean(tmp_path):
    (tmp_path / "models.toml").write_text("")
    for text, want in (("", True), ("cuda_graphs = false\n", False)):
        (tmp_path / "cortex.toml").write_text(f"[engine]\n{text}")
        assert load(tmp_path / "cortex.toml").engine.cuda_graphs is want
    (tmp_path / "cortex.toml").write_text("[engine]\ncuda_graphs = 1\n")
    with pytest.raises(ConfigError, match=r"\[engine\] cuda_graphs"):
        load(tmp_path / "cortex.toml")


def test_the_switch_reaches_the_worker_and_the_graphs_count_in_the_models_bytes(tmp_path, tiny_qwen3):
    """Two servers with the GPU path forced on their CPU workers, graphs on and off: the same greedy
    completion, and the model with graphs is larger by their static buffers and the padding block."""
    engine = '[engine]\nkv_cache_dtype = "float32"\nmax_seqs = 4\nkv_cache_mb = 1\n'
    servers = [
        Server(tmp_path / name, tiny_models_toml(tiny_qwen3), engine + f"cuda_graphs = {name}\n", env={FORCE_ENV: "1"})
        for name in ("true", "false")
    ]
    try:
        texts, sizes = [], []
        for srv in servers:
            srv.wait_healthy()
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
            out = client.completions.create(model="tiny", prompt="hello there", max_tokens=8, temperature=0)
            texts.append(out.choices[0].text)
            (model,) = httpx.get(srv.url + "/models", timeout=30).json()["models"]
            sizes.append(model["size_bytes"])
    finally:
        for srv in servers:
            srv.stop()
    assert texts[0] == texts[1]
    kv_blocks = 2**20 // (16 * 2 * 2 * 2 * 32 * 4)  # 1 MiB of blocks: 16 positions x (K, V) x layers x heads x dim
    block = 16 * 2 * 2 * 2 * 32 * 4
    graphs = 5 * 4 * 8 + 4 * kv_blocks * 8 + 4 * 512 * 4  # [4] vectors, [4, blocks] tables, [4, vocab] logits
    assert sizes[0] - sizes[1] == graphs + block


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_graph_decode_step_syncs_the_host_once(ckpt, monkeypatch):
    """On a GPU: a decode step (graph replay, then penalties, bias, a grammar mask, seeded draws and
    logprobs sampled for the whole batch) waits for the device once, for the chosen ids."""
    import warnings

    monkeypatch.delenv(FORCE_ENV, raising=False)
    worker, loaded = load_on(ckpt, "cuda", "bfloat16", max_seqs=8)
    assert worker.models["m"].gpu.graphs.graphs  # captured
    params = [
        SamplingParams(temperature=0, repetition_penalty=1.2, logit_bias={7: 1.0}, logprobs=2),
        SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=3, frequency_penalty=0.5),
        SamplingParams(temperature=1.0, min_p=0.05),
    ]
    ps = prompts(3)
    tokens = step(worker, [SeqInput(i, p, 0, params[i], table(i), prompt=p) for i, p in enumerate(ps)])
    for k in range(3):
        allowed = bytes([0xFF] * 64)
        seqs = [SeqInput(i, [tokens[i]], len(p) + k, params[i], table(i), allowed=allowed) for i, p in enumerate(ps)]
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                tokens = step(worker, seqs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) == 1, [str(w.message) for w in syncs]

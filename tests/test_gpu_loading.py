"""Loading a model onto a GPU (issue 23, point 4), proven where no GPU is lent:

- dtype "auto" is bfloat16 on a GPU (its KV pool too) and float32 on the CPU;
- every architecture runs q, k and v as one projection and gate and up as one;
- weights go to the device one checkpoint slice at a time, in their stored dtype: the model is
  built on the "meta" device (parameters with shapes and no memory, as a GPU's would be to the
  host), and every host tensor the loader hands to the device is recorded. No two are alive at
  once, each is one checkpoint tensor or this rank's slice of it (a fused layer's parts one by
  one), and the host heap never grows by a whole tensor beyond what the reader maps;
- a GPU worker's KV pool takes the device's free memory after the weights, less the headroom and
  what is allocated after it (torch.cuda.mem_get_info is the one thing mocked); the leader asks for
  that only where the free memory is the model's to take.
"""

from __future__ import annotations

import ctypes
import math
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cortex.config import ConfigError, load
from cortex.leader.placement import Placement
from cortex.models import source
from cortex.models.memory import kv_headroom
from rpc.messages import KV_BLOCK_SIZE, LoadDenseShard
from tests.checkpoints import make_checkpoint, make_hybrid_checkpoint, make_moe_checkpoint
from tests.conftest import train_tiny_tokenizer
from tests.gguf_writer import write_gguf
from tests.test_gguf_loading import gguf_entry
from workers import weights
from workers.arch import ModelConfig, model_class
from workers.gpu import FORCE_ENV
from workers.gpu import memory as gpu_memory
from workers.gpu.graphs import DecodeGraphs
from workers.kv_cache import PagedKVCache
from workers.parallel import TPGroup

META = torch.device("meta")
MiB = 2**20


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Path:
    """Enough layers that the model is many times its largest tensor (the 8192-row embedding)."""
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3", tied=True, layers=32, vocab=8192)


def safetensors(path: Path) -> list[str]:
    return [str(f) for f in sorted(path.glob("*.safetensors"))]


def on_meta(cfg: ModelConfig, dtype: torch.dtype = torch.float32, tp: TPGroup | None = None):
    with torch.device(META):
        return model_class(cfg)(cfg, tp, dtype)


# -- dtype ----------------------------------------------------------------------------------------


def test_auto_dtype_is_bfloat16_on_a_gpu_and_float32_on_the_cpu(tmp_path):
    (tmp_path / "models.toml").write_text("")
    (tmp_path / "cortex.toml").write_text("")
    placement = Placement(SimpleNamespace(cfg=load(tmp_path / "cortex.toml")), stepper=None)
    state = SimpleNamespace(entry=SimpleNamespace(dtype="auto"))
    assert [placement.dtype(state, d) for d in ("cuda:0", "cuda", "cpu")] == ["bfloat16", "bfloat16", "float32"]
    assert [placement.kv_dtype(state, d) for d in ("cuda:0", "cpu")] == ["bfloat16", "float16"]
    state.entry.dtype = "float16"  # a dtype asked for is kept
    assert placement.dtype(state, "cuda:0") == placement.kv_dtype(state, "cuda:0") == "float16"


# -- fused projections ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def every_arch(tmp_path_factory) -> dict[str, ModelConfig]:
    tmp = tmp_path_factory.mktemp("archs")
    paths = {
        "llama": make_checkpoint(tmp / "llama", "llama", tied=False),
        "qwen3": make_checkpoint(tmp / "qwen3", "qwen3", tied=True),
        "qwen3_moe": make_moe_checkpoint(tmp / "qwen3_moe", "qwen3_moe"),  # layer 1 dense
        "qwen3_5": make_hybrid_checkpoint(tmp / "qwen3_5"),
    }
    return {arch: ModelConfig.from_hf_dir(p) for arch, p in paths.items()}


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen3_moe", "qwen3_5"])
def test_every_architecture_runs_qkv_and_gate_up_as_one_projection_each(every_arch, arch):
    cfg = every_arch[arch]
    model = on_meta(cfg)
    names = [n for n, _ in model.named_parameters()]
    split = [n for n in names if any(f".{p}." in n for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))]
    assert split == []
    qkv = [n for n in names if n.endswith("self_attn.qkv_proj.weight")]
    assert len(qkv) == cfg.kv_layers >= 1  # every full-attention layer
    for layer in model.model.layers:
        mlp_params = [n for n, _ in layer.mlp.named_parameters()]
        assert any(n.startswith("gate_up_proj") for n in mlp_params) or any(
            "experts.gate_up_proj" in n for n in mlp_params
        ), mlp_params
    parts = {n: getattr(p, "parts", None) for n, p in model.named_parameters()}
    assert [name for name, _ in parts[qkv[0]]] == ["q_proj", "k_proj", "v_proj"]


# -- weights straight to the device ---------------------------------------------------------------


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _Mallinfo2


def heap_in_use() -> int:
    """Bytes malloc has handed out and not had back (torch's and numpy's host tensors among them)."""
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


@pytest.fixture
def transfers(monkeypatch) -> list[dict]:
    """Every host tensor the loader moves to the device: shape, dtype, bytes, the heap's growth at
    that moment, and how many of the tensors handed over before it are still alive."""
    seen: list[dict] = []
    alive: list[weakref.ref] = []
    base = heap_in_use()
    move = weights._to_device

    def spy(host: torch.Tensor, device: torch.device) -> torch.Tensor:
        assert host.device.type == "cpu"
        seen.append(
            dict(
                shape=tuple(host.shape),
                dtype=host.dtype,
                nbytes=host.nbytes,
                heap=heap_in_use() - base,
                earlier_alive=sum(r() is not None for r in alive),
            )
        )
        alive.append(weakref.ref(host))
        return move(host, device)

    monkeypatch.setattr(weights, "_to_device", spy)
    return seen


def test_each_checkpoint_tensor_crosses_alone_in_its_stored_dtype(qwen3, transfers):
    """A float32 file into a bfloat16 model: converted on the device, not on the host."""
    cfg = ModelConfig.from_hf_dir(qwen3)
    model = on_meta(cfg, torch.bfloat16)
    weights.load_weights(model, "safetensors", safetensors(qwen3))
    params = list(model.parameters())
    assert {p.device.type for p in params} == {"meta"} and {p.dtype for p in params} == {torch.bfloat16}
    assert {t["dtype"] for t in transfers} == {torch.float32}
    assert max(t["earlier_alive"] for t in transfers) == 0  # one at a time
    # exactly the model's values crossed: no tensor twice, none whole where a part will do
    assert sum(t["nbytes"] for t in transfers) == 4 * sum(p.numel() for p in params)
    # the fused q/k/v of each layer crossed as its three checkpoint tensors
    hd, h = cfg.head_dim, cfg.hidden_size
    qkv = [(cfg.num_heads * hd, h), (cfg.num_kv_heads * hd, h), (cfg.num_kv_heads * hd, h)]
    shapes = [t["shape"] for t in transfers]
    assert sum(shapes[i : i + 3] == qkv for i in range(len(shapes))) == cfg.num_layers


def test_no_host_copy_of_the_model_is_made(qwen3, transfers):
    """The host heap never grows by the largest tensor, let alone by the model (four times it):
    the reader maps the file, and nothing is copied or converted on the host."""
    cfg = ModelConfig.from_hf_dir(qwen3)
    model = on_meta(cfg, torch.bfloat16)
    weights.load_weights(model, "safetensors", safetensors(qwen3))
    largest = max(t["nbytes"] for t in transfers)
    total = sum(t["nbytes"] for t in transfers)
    assert total > 4 * largest
    assert max(t["heap"] for t in transfers) < largest


def test_a_tensor_parallel_rank_reads_only_its_slices(qwen3, transfers):
    cfg = ModelConfig.from_hf_dir(qwen3)
    model = on_meta(cfg, tp=TPGroup(1, 2))
    weights.load_weights(model, "safetensors", safetensors(qwen3))
    held = sum(p.numel() for p in model.parameters())
    assert held < sum(p.numel() for p in on_meta(cfg).parameters())  # the rank holds a part of the model
    assert sum(t["nbytes"] for t in transfers) == 4 * held  # and only that part was read
    assert max(t["earlier_alive"] for t in transfers) == 0


def test_a_gguf_file_crosses_one_dequantized_tensor_at_a_time(tmp_path, transfers):
    ckpt = make_checkpoint(tmp_path / "hf", "llama", tied=False)
    train_tiny_tokenizer(ckpt)
    files = source.read(gguf_entry(write_gguf(ckpt, tmp_path / "m.gguf")))
    model = on_meta(files.config, torch.bfloat16)
    weights.load_weights(model, "gguf", [str(f) for f in files.files], quantize="none")
    assert max(t["earlier_alive"] for t in transfers) == 0
    assert sum(t["nbytes"] for t in transfers) == 4 * sum(p.numel() for p in model.parameters())


def test_loading_on_the_host_still_gives_the_checkpoints_values(qwen3):
    """The device-side path on a CPU model: fused parts land in their rows, values as stored."""
    from safetensors.torch import load_file

    cfg = ModelConfig.from_hf_dir(qwen3)
    model = model_class(cfg)(cfg)
    weights.load_weights(model, "safetensors", safetensors(qwen3))
    stored = load_file(safetensors(qwen3)[0])
    ours = model.hf_state_dict()
    assert set(ours) <= set(stored)
    for name, value in ours.items():
        assert torch.equal(value, stored[name]), name


# -- the KV pool from free device memory ----------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("small"), "qwen3", tied=True)


def load_msg(path: Path, **fields) -> LoadDenseShard:
    cfg = ModelConfig.from_hf_dir(path)
    return LoadDenseShard("m", "safetensors", safetensors(path), cfg.to_dict(), "float32", **fields)


@pytest.fixture
def device_memory(monkeypatch):
    """A GPU's memory as the worker reads it: ``free`` bytes (set by the test), the calls in order."""
    gpu = SimpleNamespace(free=0, calls=[])
    monkeypatch.setenv(FORCE_ENV, "1")  # the GPU path on this CPU worker
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: gpu.calls.append("empty_cache"))

    def mem_get_info(device=None):
        gpu.calls.append("mem_get_info")
        return gpu.free, 80 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    return gpu


def test_the_pool_and_what_follows_it_fill_the_free_memory_less_the_headroom(small, device_memory):
    """With graphs: the pool, the graphs' padding block and static buffers (whose real size
    DecodeGraphs reports) fit in free - headroom, and one block more would not."""
    cfg = ModelConfig.from_hf_dir(small)
    model = model_class(cfg)(cfg)
    msg, headroom = load_msg(small, kv_blocks=8, max_seqs=8), 3 * MiB
    device_memory.free = 40 * MiB + 12345
    blocks = gpu_memory.kv_pool_blocks(torch.device("cpu"), msg, headroom, model, torch.bfloat16, graphs=True)
    assert device_memory.calls == ["empty_cache", "mem_get_info"]  # the load's cached blocks handed back first
    block = gpu_memory.block_bytes(model, torch.bfloat16)
    cache = PagedKVCache(*model.kv_shape()[:3], torch.bfloat16, torch.device("cpu"), blocks + 1)
    assert cache.nbytes() == (blocks + 1) * block
    graphs = DecodeGraphs(
        model, cache, 8, math.ceil(cfg.max_position_embeddings / KV_BLOCK_SIZE), cfg.vocab_size, blocks
    )
    after = graphs.static_bytes()
    assert cache.nbytes() + after <= device_memory.free - headroom < cache.nbytes() + after + block


def test_without_graphs_the_pool_takes_all_but_the_headroom(small, device_memory):
    cfg = ModelConfig.from_hf_dir(small)
    model = model_class(cfg)(cfg)
    block = gpu_memory.block_bytes(model, torch.float16)
    assert block == 2 * cfg.num_layers * KV_BLOCK_SIZE * cfg.num_kv_heads * cfg.head_dim * 2
    device_memory.free = 1000 * block + 5
    got = gpu_memory.kv_pool_blocks(torch.device("cpu"), load_msg(small), 100 * block, model, torch.float16, False)
    assert got == 900


def test_a_hybrid_keeps_room_for_its_state_pool(device_memory, tmp_path):
    path = make_hybrid_checkpoint(tmp_path / "hybrid")
    cfg = ModelConfig.from_hf_dir(path)
    model = model_class(cfg)(cfg)
    msg = load_msg(path, state_slots=20)
    states = model.new_state_pool(20, torch.device("cpu"))
    state_bytes = states.conv.nbytes + states.delta.nbytes
    assert gpu_memory.state_pool_bytes(model, 20) == state_bytes == 20 * cfg.state_slot_bytes(1, "float32")
    block = gpu_memory.block_bytes(model, torch.float32)
    device_memory.free = state_bytes + 50 * block
    assert gpu_memory.kv_pool_blocks(torch.device("cpu"), msg, 0, model, torch.float32, graphs=False) == 50
    # with graphs: a slot more (the padding rows'), and the graphs' buffers and padding block
    slot = cfg.state_slot_bytes(1, "float32")
    static = gpu_memory.graph_static_bytes(msg.max_seqs, cfg.max_position_embeddings, cfg.vocab_size)
    device_memory.free = state_bytes + slot + static + block + 50 * block
    assert gpu_memory.kv_pool_blocks(torch.device("cpu"), msg, 0, model, torch.float32, graphs=True) == 50


def test_never_fewer_blocks_than_the_leader_asked_for(small, device_memory):
    cfg = ModelConfig.from_hf_dir(small)
    model = model_class(cfg)(cfg)
    device_memory.free = 10 * MiB
    msg = load_msg(small, kv_blocks=4096)
    assert gpu_memory.kv_pool_blocks(torch.device("cpu"), msg, 2 * MiB, model, torch.float32, graphs=True) == 4096


def test_the_cpu_and_a_fixed_pool_never_read_device_memory(small, monkeypatch):
    cfg = ModelConfig.from_hf_dir(small)
    model = model_class(cfg)(cfg)

    def no_gpu(*_a):
        raise AssertionError("device memory read")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_gpu)
    monkeypatch.delenv(FORCE_ENV, raising=False)
    msg = load_msg(small, kv_blocks=32)
    assert gpu_memory.kv_pool_blocks(torch.device("cpu"), msg, 0, model, torch.float32, graphs=False) == 32
    monkeypatch.setenv(FORCE_ENV, "1")
    assert gpu_memory.kv_pool_blocks(torch.device("cpu"), msg, -1, model, torch.float32, graphs=True) == 32


# -- the leader's side ----------------------------------------------------------------------------


def config(tmp_path, node: str = "", engine: str = ""):
    (tmp_path / "models.toml").write_text("")
    (tmp_path / "cortex.toml").write_text(f"[node]\n{node}[engine]\n{engine}")
    return load(tmp_path / "cortex.toml")


def test_the_leader_asks_for_the_free_memory_only_where_it_is_the_models(tmp_path):
    cfg = config(tmp_path)
    assert cfg.engine.kv_cache_fill is True and cfg.node.memory_headroom_mb == 512
    gpus = ["cuda:0", "cuda:1"]
    assert kv_headroom(cfg, gpus, [1]) == kv_headroom(cfg, gpus, [0, 1]) == 512 * MiB
    assert kv_headroom(cfg, ["cpu"], [0]) == -1  # a CPU's free memory is the host's RAM
    assert kv_headroom(cfg, ["cuda:0", "cuda:0"], [0]) == -1  # two workers on one GPU
    assert kv_headroom(config(tmp_path, engine="kv_cache_fill = false\n"), gpus, [0]) == -1
    assert kv_headroom(config(tmp_path, node="memory_budget_mb = 4096\n"), gpus, [0]) == -1  # a share, not all
    assert kv_headroom(config(tmp_path, node="memory_headroom_mb = 2048\n"), gpus, [0]) == 2048 * MiB


def test_kv_cache_fill_is_a_boolean(tmp_path):
    with pytest.raises(ConfigError, match=r"\[engine\] kv_cache_fill"):
        config(tmp_path, engine="kv_cache_fill = 1\n")


def test_a_gpu_worker_reports_the_pool_it_sized(small, device_memory):
    """The worker (its GPU path forced on this CPU) sizes the pool from the free memory it reads
    after the weights and tells the leader in Loaded; the padding block stays its own."""
    from rpc.messages import Loaded
    from workers.worker import Worker

    device_memory.free = 64 * MiB
    worker = Worker("cpu")
    loaded = worker.handle(load_msg(small, kv_blocks=8, max_seqs=4, kv_headroom=16 * MiB))
    assert isinstance(loaded, Loaded), loaded
    rm = worker.models["m"]
    block = gpu_memory.block_bytes(rm.model, torch.float32)
    after = rm.gpu.graphs.static_bytes() + block  # the graphs' buffers and padding block
    assert loaded.kv_blocks == rm.cache.num_blocks - 1 == (48 * MiB - after) // block > 8
    assert loaded.kv_bytes == rm.cache.nbytes() and loaded.graph_bytes == rm.gpu.graphs.static_bytes()
    assert loaded.kv_bytes + loaded.graph_bytes <= 48 * MiB

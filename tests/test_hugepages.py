"""A CPU worker's packed weights live in transparent huge pages (workers/hugepages.py): moved there
after loading, they compute exactly what they computed before, and ``CORTEX_HUGE_PAGES=0`` leaves
them where they were."""

from __future__ import annotations

import pytest
import torch

from tests.checkpoints import make_checkpoint
from tests.conftest import needs_native_kernels
from workers import hugepages
from workers.arch import ModelConfig, model_class
from workers.kv_cache import BLOCK_SIZE, PagedKVCache, StepBatch
from workers.weights import load_weights

pytestmark = needs_native_kernels
CPU = torch.device("cpu")


def _model(path, quantize: str):
    cfg = ModelConfig.from_hf_dir(path)
    model = model_class(cfg)(cfg)
    load_weights(model, "safetensors", [str(f) for f in sorted(path.glob("*.safetensors"))], quantize=quantize)
    return model


def _steps(model, steps: int = 6) -> list[torch.Tensor]:
    """Two prompts prefilled together, then greedy decode steps (the native one-call path)."""
    layers, kv_heads, head_dim, _ = model.kv_shape()
    cache = PagedKVCache(layers, kv_heads, head_dim, torch.float32, CPU, 16)
    prompts, tables = [[5, 9, 2, 7], list(range(3, 23))], [[0, 1], [2, 3, 4]]
    logits = [model(StepBatch.build([(p, 0, t) for p, t in zip(prompts, tables, strict=True)], BLOCK_SIZE, CPU), cache)]
    lengths = [len(p) for p in prompts]
    for _ in range(steps):
        rows = [([n], L, t) for n, L, t in zip(logits[-1].argmax(-1).tolist(), lengths, tables, strict=True)]
        logits.append(model(StepBatch.build(rows, BLOCK_SIZE, CPU), cache))
        lengths = [L + 1 for L in lengths]
    return logits


def _huge_kib(address: int) -> int:
    """AnonHugePages (KiB) of this process's mapping that holds ``address``."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:  # a mapping's first line: its address range
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_moved_weights_sit_in_huge_pages_and_compute_the_same_bits(tmp_path, quantize, monkeypatch):
    monkeypatch.delenv(hugepages.ENV, raising=False)
    if not hugepages.available():
        pytest.skip("transparent huge pages are off on this machine")
    path = make_checkpoint(tmp_path, "llama", tied=True)
    moved, kept = _model(path, quantize), _model(path, quantize)
    weights = hugepages.packed_weights(moved)
    assert weights and all(w.is_contiguous() for w in weights)
    assert hugepages.move_to_huge_pages(moved) == sum(w.numel() * w.element_size() for w in weights)
    huge = [_huge_kib(w.data_ptr()) > 0 for w in hugepages.packed_weights(moved)]
    if not any(huge):  # advised, but the kernel may fall back to small pages (fragmented memory)
        pytest.skip("the kernel gave these mappings no huge pages")
    assert all(huge)
    assert all(w.data_ptr() % hugepages.ALIGN == 0 for w in hugepages.packed_weights(moved))
    got, want = _steps(moved), _steps(kept)
    assert moved._layer_table is not None  # the decode steps ran natively, on the moved weights
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_the_environment_can_keep_them_where_they_are(tmp_path, monkeypatch):
    monkeypatch.setenv(hugepages.ENV, "0")
    model = _model(make_checkpoint(tmp_path, "llama", tied=True), "int4")
    before = [w.data_ptr() for w in hugepages.packed_weights(model)]
    assert hugepages.move_to_huge_pages(model) == 0
    assert [w.data_ptr() for w in hugepages.packed_weights(model)] == before


def test_a_tensor_larger_than_a_chunk_gets_a_mapping_of_its_own(monkeypatch):
    monkeypatch.delenv(hugepages.ENV, raising=False)
    if not hugepages.available():
        pytest.skip("transparent huge pages are off on this machine")
    monkeypatch.setattr(hugepages, "CHUNK", hugepages.HUGE)  # 2 MiB chunks: the 3 MiB tensor fits none
    small, big = torch.arange(1000, dtype=torch.int16), torch.arange(3 << 18, dtype=torch.int32)
    layer = torch.nn.Module()
    layer.impl = "native"
    layer.packed, layer.scales = torch.nn.Parameter(small.clone(), False), torch.nn.Parameter(big.clone(), False)
    assert hugepages.move_to_huge_pages(layer) == small.numel() * 2 + big.numel() * 4
    assert torch.equal(layer.packed, small) and torch.equal(layer.scales, big)
    assert len(layer._huge_pages) == 2  # the small one's chunk, then one as large as the big one
    assert layer.packed.data_ptr() % hugepages.HUGE == 0 and layer.scales.data_ptr() % hugepages.HUGE == 0


def test_a_refused_mapping_leaves_the_weights_working_where_they_were(tmp_path, monkeypatch):
    """A memory limit or a sandbox that refuses the mapping costs the speed-up, never the load."""
    monkeypatch.delenv(hugepages.ENV, raising=False)
    monkeypatch.setattr(hugepages, "available", lambda: True)

    def refused(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(hugepages.mmap, "mmap", refused)
    path = make_checkpoint(tmp_path, "llama", tied=True)
    model, plain = _model(path, "int4"), _model(path, "int4")
    before = [w.data_ptr() for w in hugepages.packed_weights(model)]
    assert hugepages.move_to_huge_pages(model) == 0
    assert [w.data_ptr() for w in hugepages.packed_weights(model)] == before
    for a, b in zip(_steps(model, 2), _steps(plain, 2), strict=True):
        assert torch.equal(a, b)

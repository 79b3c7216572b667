"""The native decode step (workers/kernels/decode.c): when every row of a step decodes, all decoder
layers run in one native call, which must give the layer-by-layer forward's logits bit for bit
(the same kernels in the same order), for Llama and Qwen3 (q/k norms), Q4 and Q8 layers, several
sequences of different lengths; and steps it cannot take (prefill chunks, dense weights) keep
the layer-by-layer path."""

from __future__ import annotations

import pytest
import torch

from tests.checkpoints import make_checkpoint
from tests.conftest import needs_native_kernels
from workers.arch import ModelConfig, model_class
from workers.kv_cache import BLOCK_SIZE, PagedKVCache, StepBatch
from workers.weights import load_weights

pytestmark = needs_native_kernels


def _model(path, quantize: str):
    cfg = ModelConfig.from_hf_dir(path)
    model = model_class(cfg)(cfg)
    load_weights(model, "safetensors", [str(f) for f in sorted(path.glob("*.safetensors"))], quantize=quantize)
    return model


PROMPTS = [[5, 9, 2, 7], list(range(3, 23)), [11] * 9]
TABLES = [[0, 1], [2, 3, 4], [5, 6]]


def _run(
    model, native: bool, kv_dtype=torch.float32, prompts=PROMPTS, tables=TABLES, steps: int = 5
) -> list[torch.Tensor]:
    """The prompts prefilled together, then ``steps`` steps where all of them decode (greedy)."""
    model.native_decode = native
    layers, kv_heads, head_dim, _ = model.kv_shape()
    blocks = max(16, 1 + max(b for t in tables for b in t))
    cache = PagedKVCache(layers, kv_heads, head_dim, kv_dtype, torch.device("cpu"), blocks)
    seqs = [(p, 0, t) for p, t in zip(prompts, tables, strict=True)]
    logits = [model(StepBatch.build(seqs, BLOCK_SIZE, torch.device("cpu")), cache)]
    lengths = [len(p) for p in prompts]
    for _ in range(steps):
        nxt = logits[-1].argmax(-1).tolist()
        seqs = [([n], L, t) for n, L, t in zip(nxt, lengths, tables, strict=True)]
        logits.append(model(StepBatch.build(seqs, BLOCK_SIZE, torch.device("cpu")), cache))
        lengths = [L + 1 for L in lengths]
    return logits


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("quantize", ["int4", "int8"])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16], ids=["kv32", "kv16"])
def test_the_native_decode_step_equals_the_layer_by_layer_forward(tmp_path, arch, quantize, kv_dtype):
    model = _model(make_checkpoint(tmp_path, arch, tied=True), quantize)
    fused, stepwise = _run(model, True, kv_dtype), _run(model, False, kv_dtype)
    assert model._layer_table is not None  # the decode steps did run natively
    for a, b in zip(fused, stepwise, strict=True):
        assert torch.equal(a, b)


def test_dense_weights_keep_the_layer_by_layer_path(tmp_path):
    model = _model(make_checkpoint(tmp_path, "llama", tied=False), "none")
    _run(model, native=True)
    assert model._layer_table is None


def test_without_native_kernels_a_float16_pool_still_decodes(tmp_path, monkeypatch):
    """No C compiler: PyTorch's paths convert keys and values to and from the float16 pool and
    compute what the native kernels compute on it."""
    from workers import native

    model = _model(make_checkpoint(tmp_path, "qwen3", tied=True), "none")
    want = _run(model, True, torch.float16)
    monkeypatch.setattr(native, "_kernels", None)
    got = _run(model, True, torch.float16)
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max() < 1e-3 * b.abs().max()

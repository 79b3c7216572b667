"""CUDA graphs for decode steps (workers/gpu/graphs.py): what runs without a GPU. Buckets, padding
and buffer sizing are plain bookkeeping; a padded step run eagerly through the static buffers must
give the logits of the ordinary step, and padding rows must write only the scratch block. Capture
itself needs CUDA: on the CPU it is skipped with a log line."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.checkpoints import randomize
from workers.arch import model_class
from workers.arch.config import ModelConfig
from workers.gpu.graphs import DecodeGraphs, StaticInputs, bucket_sizes, fill, pick_bucket
from workers.kv_cache import PagedKVCache, StepBatch

CPU = torch.device("cpu")
BS = 16


def test_buckets_are_powers_of_two_then_the_maximum():
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert bucket_sizes(48) == (1, 2, 4, 8, 16, 32, 48)
    with pytest.raises(ValueError):
        bucket_sizes(0)


@pytest.mark.parametrize(("n", "bucket"), [(1, 1), (3, 4), (4, 4), (5, 8), (33, 48), (48, 48), (49, None)])
def test_a_batch_takes_the_smallest_bucket_that_holds_it(n, bucket):
    assert pick_bucket(n, bucket_sizes(48)) == bucket


def test_fill_writes_rows_then_padding_into_the_scratch_block():
    host = StaticInputs.allocate(8, 4, CPU)
    fill(host, [(11, 0, [5]), (12, 17, [3, 9, 2])], bucket=4, block_size=BS, pad_block=7)
    assert host.tokens[:4].tolist() == [11, 12, 0, 0]
    assert host.positions[:4].tolist() == [0, 17, 0, 0]
    assert host.lengths[:4].tolist() == [1, 18, 1, 1]
    assert host.slots[:4].tolist() == [5 * BS, 9 * BS + 1, 7 * BS, 7 * BS]  # padding writes block 7 only
    assert host.tables[:4].tolist() == [[5, 7, 7, 7], [3, 9, 7, 7], [7, 7, 7, 7], [7, 7, 7, 7]]
    with pytest.raises(ValueError, match="needs 2 blocks"):
        fill(host, [(1, 16, [5])], bucket=1, block_size=BS, pad_block=7)


def test_static_buffers_are_sized_and_counted():
    cache = PagedKVCache(1, 1, 16, torch.float32, CPU, 4)
    graphs = DecodeGraphs(lambda b, kv: None, cache, max_batch=64, max_blocks=32, vocab=1000, pad_block=3)
    assert graphs.buckets == (1, 2, 4, 8, 16, 32, 64)
    assert graphs.static.tables.shape == (64, 32)
    # five [64] int64 vectors (tokens, positions, slots, lengths, rows), [64, 32] tables, [64, 1000] fp32 logits
    assert graphs.static_bytes() == 5 * 64 * 8 + 64 * 32 * 8 + 64 * 1000 * 4
    assert graphs.reserved_bytes() == graphs.static_bytes()  # nothing captured: no pool


def test_capture_is_skipped_without_cuda(caplog):
    cache = PagedKVCache(1, 1, 16, torch.float32, CPU, 4)
    graphs = DecodeGraphs(lambda b, kv: None, cache, max_batch=4, max_blocks=2, vocab=10, pad_block=3)
    with caplog.at_level(logging.INFO, logger="workers.gpu.graphs"):
        assert graphs.capture() is False
    assert "no CUDA device, decode steps run eagerly" in caplog.text
    assert graphs.graphs == {}


def tiny_model():
    cfg = ModelConfig(
        arch="qwen3", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=32, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=512,
        tie_word_embeddings=True, qk_norm=True,
    )  # fmt: skip
    model = model_class(cfg)(cfg, dtype=torch.float32)
    randomize(model)
    return model


@pytest.mark.parametrize("native_decode", [True, False], ids=["native", "pytorch"])
def test_padded_step_gives_the_ordinary_steps_logits(native_decode):
    """Three sequences of different lengths, prefilled normally, then one decode step two ways: the
    ordinary StepBatch, and the graphs' static buffers padded to bucket 4 (run eagerly on the CPU).
    Same logits, and the padding row wrote nothing outside the scratch block."""
    model = tiny_model()
    model.native_decode = native_decode
    prompts = [[5, 9, 1], list(range(3, 23)), [7] * 33]
    tables = [[0], [1, 2], [3, 4, 5]]
    scratch = 6
    cache = PagedKVCache(*model.kv_shape()[:3], torch.float32, CPU, 8)
    model(StepBatch.build([(p, 0, t) for p, t in zip(prompts, tables, strict=True)], BS, CPU), cache)
    steps = [(int(p[-1]) + 1, len(p), t) for p, t in zip(prompts, tables, strict=True)]

    ordinary = PagedKVCache(*model.kv_shape()[:3], torch.float32, CPU, 8)
    ordinary.k.copy_(cache.k)
    ordinary.v.copy_(cache.v)
    want = model(StepBatch.build([([tok], pos, t) for tok, pos, t in steps], BS, CPU), ordinary)

    graphs = DecodeGraphs(model, cache, max_batch=8, max_blocks=4, vocab=128, pad_block=scratch)
    got = graphs.run(steps)
    assert got.shape == (3, 128)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    outside = torch.ones(cache.k.shape[1], dtype=torch.bool)
    outside[scratch * BS : (scratch + 1) * BS] = False
    torch.testing.assert_close(cache.k[:, outside], ordinary.k[:, outside])  # same KV writes but the scratch block's

"""The CPU kernel paths (workers/native.py): each instruction set's build of the same kernels, picked
once from what the CPU reports, overridable with ``CORTEX_CPU_KERNELS``, named in the worker's load
line; and every path this machine can run gives the same answers.

What "the same" means here:
- the native paths (avx2, avx512, avx512vnni) compute the same exact integer block products and
  add them in the same order: their outputs are equal bit for bit, kernel by kernel and logits of
  the default model;
- the torch fallback (PyTorch's int4/int8 kernels, bfloat16 activations and head outputs) differs
  from them by bfloat16's rounding (8 bits of mantissa: steps of 0.125 for logits of 16-32):
  SmolLM2's logits within 1.0 at most and 0.2 on average (measured: 0.61 and 0.10 over 19 decode
  steps; a row's logits span about 40), the same greedy text on the prompts below.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.checkpoints import make_checkpoint
from tests.conftest import needs_native_kernels
from workers import cpu, native
from workers.arch import ModelConfig
from workers.kv_cache import BLOCK_SIZE
from workers.quant import Q4Blocks, QuantLinear

ROOT = Path(__file__).resolve().parents[1]
AVX2_ONLY = frozenset({"avx2", "fma", "f16c"})
EVERYTHING = frozenset(cpu.SIMD)  # AVX-512 with VNNI and BF16, and AMX
TORCH_LOGIT_MAX, TORCH_LOGIT_MEAN = 1.0, 0.2  # bfloat16 against int16 activations (see above)


@pytest.fixture
def cpu_reports(monkeypatch):
    """Pretend the CPU reports these SIMD features (the choice reads nothing else)."""

    def pretend(features: frozenset[str] | None) -> None:
        monkeypatch.setattr(cpu, "simd_features", lambda: features)

    monkeypatch.delenv(native.ENV, raising=False)
    monkeypatch.delenv("CORTEX_NATIVE_KERNELS", raising=False)
    return pretend


def test_the_best_path_the_cpu_reports_is_chosen(cpu_reports):
    cpu_reports(AVX2_ONLY)
    assert native.runnable_paths() == ["avx2"] and native.chosen_path() == "avx2"
    cpu_reports(AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl"})
    assert native.chosen_path() == "avx512"
    cpu_reports(AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"})
    assert native.chosen_path() == "avx512vnni"
    cpu_reports(EVERYTHING)  # AMX reported: not used, nothing else changes
    assert native.chosen_path() == "avx512vnni"
    cpu_reports(frozenset({"avx512f"}))  # no AVX2 (an odd VM): PyTorch's kernels
    assert native.runnable_paths() == [] and native.chosen_path() == "torch"


def test_the_override_takes_any_path_the_cpu_runs_and_refuses_the_others(cpu_reports, monkeypatch, caplog):
    cpu_reports(EVERYTHING)
    for path in ("avx2", "avx512", "avx512vnni", "torch"):
        monkeypatch.setenv(native.ENV, path)
        assert native.chosen_path() == path
    monkeypatch.setenv(native.ENV, "torch")
    assert native.load() is None
    cpu_reports(AVX2_ONLY)
    monkeypatch.setenv(native.ENV, "avx512vnni")  # this CPU cannot: the best one it can, said so
    with caplog.at_level(logging.WARNING, logger="cortex.worker"):
        assert native.chosen_path() == "avx2"
    assert "this CPU cannot run it" in caplog.text
    assert native.load("avx512") is None  # never built nor loaded for a CPU without AVX-512
    monkeypatch.setenv(native.ENV, "avx1024")
    assert native.chosen_path() == "avx2"
    monkeypatch.setenv("CORTEX_NATIVE_KERNELS", "0")  # the older switch still turns them all off
    monkeypatch.setenv(native.ENV, "avx2")
    assert native.chosen_path() == "torch"


@needs_native_kernels
def test_a_path_that_does_not_build_gives_way_to_the_next_best(monkeypatch, tmp_path):
    runnable = native.runnable_paths()
    if len(runnable) < 2:
        pytest.skip("this CPU runs one kernel path only")
    best, next_best = runnable[-1], runnable[-2]
    monkeypatch.delenv(native.ENV, raising=False)
    monkeypatch.setenv("CORTEX_KERNEL_CACHE", str(tmp_path))
    needs, _ = native.PATHS[best]
    monkeypatch.setitem(native.PATHS, best, (needs, ("-mno-such-instructions",)))  # as an old compiler would fail
    assert native.load(best) is None
    assert native.load().name == next_best


@needs_native_kernels
def test_the_loaded_kernels_name_their_path():
    assert native.path_name() == native.kernels().name == native.chosen_path()
    assert native.kernels().name in native.runnable_paths()


def _attention_inputs(B: int = 5, hq: int = 9, hkv: int = 3, d: int = 64, half: bool = True):
    g = torch.Generator().manual_seed(1)
    blocks = 24
    dtype = torch.float16 if half else torch.float32
    k = torch.randn(blocks * BLOCK_SIZE, hkv, d, generator=g).to(dtype)
    v = torch.randn(blocks * BLOCK_SIZE, hkv, d, generator=g).to(dtype)
    tables = torch.randperm(blocks, generator=g)[: B * 4].view(B, 4).to(torch.int64)
    lengths = torch.tensor([1, 17, 40, 64, 33][:B], dtype=torch.int64)
    return torch.randn(B, hq, d, generator=g), k, v, tables, lengths


@needs_native_kernels
@pytest.mark.parametrize("path", ["avx512", "avx512vnni"])
def test_every_path_computes_the_avx2_kernels_bits(path):
    if path not in native.runnable_paths():
        pytest.skip(f"this CPU cannot run the {path} kernels")
    base, other = native.load("avx2"), native.load(path)
    assert other.name == path and other.path != base.path  # its own shared object
    g = torch.Generator().manual_seed(0)
    for k in (64, 96, 576, 1536):  # an even and odd number of blocks, the model's widths
        w = torch.randn(48, k, generator=g)
        q4, q8 = QuantLinear.int4(Q4Blocks.quantize(w), impl="native"), QuantLinear.int8(w, impl="native")
        for rows in (1, 3, 4, 17, 70):  # tiles of every height, and more than a chunk of 64
            x = torch.randn(rows, k, generator=g)
            for kernels_ in (base, other):
                assert torch.isfinite(kernels_.q4_matmul(x, q4.packed, q4.scales.data)).all()
            assert torch.equal(
                base.q4_matmul(x, q4.packed, q4.scales.data), other.q4_matmul(x, q4.packed, q4.scales.data)
            )
            assert torch.equal(base.q8_matmul(x, q8.packed, q8.scales), other.q8_matmul(x, q8.packed, q8.scales))
    for half in (True, False):
        q, k_pool, v_pool, tables, lengths = _attention_inputs(half=half)
        a = base.paged_attention(q, k_pool, v_pool, tables, lengths, BLOCK_SIZE, 0.125)
        b = other.paged_attention(q, k_pool, v_pool, tables, lengths, BLOCK_SIZE, 0.125)
        assert torch.equal(a, b)
    x, wn = torch.randn(7, 576, generator=g), torch.randn(576, generator=g)
    assert torch.equal(base.rms_norm(x, wn, 1e-5), other.rms_norm(x, wn, 1e-5))
    gate_up = torch.randn(7, 2 * 1536, generator=g)
    assert torch.equal(base.swiglu(gate_up), other.swiglu(gate_up))


@needs_native_kernels
def test_the_worker_load_line_names_the_kernel_path(tmp_path, caplog):
    from rpc.messages import LoadDenseShard
    from workers.worker import Worker

    ckpt = make_checkpoint(tmp_path, "llama", tied=True)
    cfg = ModelConfig.from_hf_dir(ckpt)
    worker = Worker("cpu")
    with caplog.at_level(logging.INFO, logger="cortex.worker"):
        worker.handle(
            LoadDenseShard(
                model_id="m", format="safetensors", files=[str(p) for p in sorted(ckpt.glob("*.safetensors"))],
                config=cfg.to_dict(), dtype="float32", rank=0, world_size=1, kv_blocks=4, quantize="int4",
            )
        )  # fmt: skip
    loaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded m:")]
    assert loaded and loaded[0].endswith(f"CPU kernels: {native.path_name()}")


# Greedy answers of the default model in a fresh process per path (CORTEX_CPU_KERNELS set as a
# deployment would set it): the texts, and every step's logits of the first prompt.
GREEDY = """
import json, sys, torch
from cortex.config import load
from cortex.models import source
from workers import native
from workers.arch import model_class
from workers.kv_cache import LocalRunner
from workers.weights import load_weights

files = source.read(load().catalogue.models[0])
model = model_class(files.config)(files.config)
load_weights(model, files.format, [str(f) for f in files.files], quantize="auto")  # the file's Q4/Q8 blocks
impls = {getattr(m, "impl", None) for m in model.modules()} - {None}
texts, logits = [], []
for i, question in enumerate(json.loads(sys.argv[1])):
    chat = [{"role": "user", "content": question}]
    prompt = files.tokenizer.encode(files.template.render(chat))
    run = LocalRunner(model, torch.device("cpu"))
    step = run.step(0, prompt, 0)
    out = [int(step.argmax())]
    while out[-1] != 2 and len(out) < 20:
        step = run.step(0, out[-1:], len(prompt) + len(out) - 1)
        out.append(int(step.argmax()))
        if i == 0:
            logits.append(step.reshape(-1))
    texts.append(files.tokenizer.decode(out))
torch.save(torch.stack(logits), sys.argv[2])
print(json.dumps({"path": native.path_name(), "impls": sorted(impls), "texts": texts}))
"""
QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "What is 12 times 12?"]


@pytest.mark.slow
def test_smollm2_answers_the_same_on_every_path(tmp_path):
    paths = [*native.runnable_paths(), "torch"]
    answers, logits = {}, {}
    for path in paths:
        env = {**os.environ, native.ENV: path}
        out = subprocess.run(
            [sys.executable, "-c", GREEDY, json.dumps(QUESTIONS), str(tmp_path / f"{path}.pt")],
            capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["path"] == path  # the override reached the kernels it names
        assert got["impls"] == ["torch" if path == "torch" else "native"]  # and the packed linears
        answers[path], logits[path] = got["texts"], torch.load(tmp_path / f"{path}.pt")
    assert "Paris" in answers[paths[0]][0]
    for path in paths[1:]:
        assert answers[path] == answers[paths[0]], path
        if path == "torch":
            diff = (logits[path] - logits[paths[0]]).abs()
            assert diff.max() < TORCH_LOGIT_MAX and diff.mean() < TORCH_LOGIT_MEAN
        else:
            assert torch.equal(logits[path], logits[paths[0]]), path

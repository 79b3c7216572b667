"""Qwen3.5 (``qwen35``) and dense Qwen3-Next (``qwen3next``) GGUF files, written as llama.cpp's
converter writes them (tests/gguf_writer.py: its metadata keys, tensor names and value transforms),
load into the hybrid model with the same logits as the safetensors checkpoint they came from and as
transformers; quantized files stay close; the metadata that describes the model must be there."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from cortex.chat.tokenizer import from_hf_dir
from cortex.models import source
from tests.checkpoints import QWEN3_5_VOCAB, hf_hybrid_model, make_hybrid_checkpoint, write_chatml_tokenizer_config
from tests.conftest import train_tiny_tokenizer
from tests.gguf_writer import write_gguf
from tests.qwen_tok import built
from tests.test_gguf_loading import gguf_entry
from tests.test_qwen3_5 import _prefill_then_decode
from workers.arch import ModelConfig, UnsupportedModel, model_class
from workers.arch.qwen3_5 import Qwen3_5Model
from workers.gguf_file import GGUFFile
from workers.weights import load_weights

SAME = 1e-5  # GGUF f32 vs safetensors: the same weights up to the converter's f32 round trips (1 + w - 1)
TOL = 1e-4  # against transformers (as in tests/test_qwen3_5.py)
# llama.cpp describes the layer pattern by one number, full_attention_interval: every 2nd layer here
LAYERS = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
CASES = {
    "qwen3_5": dict(arch="qwen3_5"),
    "qwen3_5-tied": dict(arch="qwen3_5", tied=True),
    "qwen3_5-vlm": dict(arch="qwen3_5", vlm=True),
    "qwen3_next": dict(arch="qwen3_next"),
}
GGUF_ARCH = {"qwen3_5": gguf.MODEL_ARCH.QWEN35, "qwen3_next": gguf.MODEL_ARCH.QWEN3NEXT}


def _ckpt(tmp_path: Path, case: str) -> Path:
    path = make_hybrid_checkpoint(tmp_path / "hf", layer_types=LAYERS, **CASES[case])
    train_tiny_tokenizer(path)
    return path


def _safetensors_model(path: Path) -> Qwen3_5Model:
    cfg = ModelConfig.from_hf_dir(path)
    model = model_class(cfg)(cfg)
    load_weights(model, "safetensors", [str(path / "model.safetensors")])
    return model


def _gguf_model(path: Path, quantize: str = "none") -> Qwen3_5Model:
    files = source.read(gguf_entry(path))  # config and tokenizer from the metadata, as the server reads them
    model = model_class(files.config)(files.config)
    load_weights(model, "gguf", [str(path)], quantize=quantize)
    return model


PROMPT = torch.randint(3, 512, (20,), generator=torch.Generator().manual_seed(0)).tolist()
DECODE = [17, 250, 3, 99]


def _hf_logits(ckpt: Path) -> torch.Tensor:
    with torch.no_grad():
        return hf_hybrid_model(ckpt)(torch.tensor([PROMPT + DECODE])).logits[0]


@pytest.mark.parametrize("case", list(CASES))
def test_f32_gguf_gives_the_safetensors_logits_and_transformers(tmp_path, case):
    ckpt = _ckpt(tmp_path, case)
    want = _prefill_then_decode(_safetensors_model(ckpt), PROMPT, DECODE)
    got = _prefill_then_decode(_gguf_model(write_gguf(ckpt, tmp_path / "m.gguf")), PROMPT, DECODE)
    assert want.std() > 0.3, "logits are flat: the checkpoint was not re-randomised"
    assert (got - want).abs().max() < SAME
    assert (got - _hf_logits(ckpt)).abs().max() < TOL


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_next"])
def test_the_file_is_laid_out_as_llama_cpp_converts_it(tmp_path, arch):
    """Names from gguf's tensor list for the arch (a dense Qwen3-Next's FFN aside: gguf lists MoE
    FFN tensors only), and the converter's values: 1 + w norms, -exp(A_log), a squeezed conv."""
    ckpt = _ckpt(tmp_path, arch)
    f = GGUFFile(write_gguf(ckpt, tmp_path / "m.gguf"))
    known = {gguf.TENSOR_NAMES[t].format(bid=i) for t in gguf.MODEL_TENSORS[GGUF_ARCH[arch]] for i in range(4)}
    dense_ffn = {f"blk.{i}.ffn_{p}" for i in range(4) for p in ("gate", "up", "down")}
    stems = {n.removesuffix(".weight").removesuffix(".bias") for n in f.tensors}
    assert stems - known == (dense_ffn if arch == "qwen3_next" else set())
    if arch == "qwen3_next":
        assert "blk.0.attn_qkv.weight" in f.tensors and "blk.0.attn_gate.weight" in f.tensors  # qkvz split

    from safetensors.numpy import load_file

    hf = load_file(ckpt / "model.safetensors")

    def stored_as(name: str, want: np.ndarray) -> bool:  # float32 in the file: only rounding differs
        t = f.tensors[name]
        return float(np.abs(gguf.quants.dequantize(t.data, t.tensor_type) - want).max()) < 1e-6

    assert stored_as("output_norm.weight", 1 + hf["model.norm.weight"])
    assert stored_as("blk.1.attn_q_norm.weight", 1 + hf["model.layers.1.self_attn.q_norm.weight"])
    assert stored_as("blk.0.ssm_norm.weight", hf["model.layers.0.linear_attn.norm.weight"])  # a plain norm
    a = -np.exp(hf["model.layers.0.linear_attn.A_log"])
    if arch == "qwen3_5":  # 2 key heads, 4 value heads: grouped (k0v0 k0v1 k1v0 k1v1) -> tiled
        a = a.reshape(2, 2).T.reshape(-1)
    assert stored_as("blk.0.ssm_a", a)
    assert tuple(f.tensors["blk.0.ssm_conv1d.weight"].shape) == (4, 2 * 2 * 16 + 4 * 24)  # [kernel, channels]


QWEN3_5_TOKENS = 248077  # the real vocabulary: 248,044 ranks and 33 added tokens, 243 rows short


@pytest.fixture(scope="module")
def real_vocab(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random Qwen3.5 with the real vocabulary (tests/qwen_tok.py) and the embedding's
    248,320 rows, and its f32 GGUF."""
    root = tmp_path_factory.mktemp("real_vocab")
    ckpt = make_hybrid_checkpoint(root / "hf", tied=True, vocab=QWEN3_5_VOCAB, layer_types=LAYERS)
    shutil.copyfile(built("qwen3_5"), ckpt / "tokenizer.json")
    write_chatml_tokenizer_config(ckpt)
    return ckpt, write_gguf(ckpt, root / "m.gguf")


def test_the_token_list_is_padded_to_the_embedding_rows_as_llama_cpp_converts_it(real_vocab):
    """llama.cpp wants a token for every embedding row. The converter (TextModel.get_vocab_base)
    writes the ranks (NORMAL), the added tokens at their ids (CONTROL if special, else
    USER_DEFINED) and ``[PAD{id}]`` (UNUSED) for every id the tokenizer lacks."""
    ckpt, path = real_vocab
    f = GGUFFile(path)
    meta = f.metadata(include_bulk=True)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == int(f.tensors["token_embd.weight"].shape[-1]) == QWEN3_5_VOCAB
    hf = json.loads((ckpt / "tokenizer.json").read_text())
    ranks = {i: t for t, i in hf["model"]["vocab"].items()}
    assert all(tokens[i] == t and types[i] == gguf.TokenType.NORMAL for i, t in ranks.items())
    for added in hf["added_tokens"]:
        kind = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
        assert (tokens[added["id"]], types[added["id"]]) == (added["content"], kind)
    assert tokens[QWEN3_5_TOKENS:] == [f"[PAD{i}]" for i in range(QWEN3_5_TOKENS, QWEN3_5_VOCAB)]
    assert set(types[QWEN3_5_TOKENS:]) == {gguf.TokenType.UNUSED}
    assert tokens[meta["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
    assert tokens[meta["tokenizer.ggml.bos_token_id"]] == "<|im_start|>"


def test_a_padded_vocabulary_loads_with_the_same_logits_and_never_encodes_to_a_pad(real_vocab):
    ckpt, path = real_vocab
    want = _prefill_then_decode(_safetensors_model(ckpt), PROMPT, DECODE)
    assert (_prefill_then_decode(_gguf_model(path), PROMPT, DECODE) - want).abs().max() < SAME
    tok = source.read(gguf_entry(path)).tokenizer
    chat = "<|im_start|>user\nThe keeper wrote the log<|im_end|>\n<|im_start|>assistant\n<think>"
    assert tok.encode(chat) == from_hf_dir(ckpt).encode(chat)  # added tokens at their ids
    spelled = tok.encode("[PAD248100] [PAD248319][PAD0]")  # a pad's name is text, not the pad
    assert spelled and max(spelled) < QWEN3_5_TOKENS


def test_pad_entries_are_not_vocabulary_never_sampled_nor_decoded(real_vocab):
    """As llama.cpp treats UNUSED tokens, and as the checkpoint's own tokenizer has no such ids: the
    vocabulary is the tokenizer's 248,077 tokens (ids past it are masked before sampling) and a pad
    id decodes to nothing."""
    tok = source.read(gguf_entry(real_vocab[1])).tokenizer
    assert tok.vocab_size == from_hf_dir(real_vocab[0]).vocab_size == QWEN3_5_TOKENS
    assert tok.decode([QWEN3_5_TOKENS + 23]) == ""


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_next"])
def test_config_from_the_metadata_is_the_checkpoints(tmp_path, arch):
    ckpt = _ckpt(tmp_path, arch)
    from_gguf = source.read(gguf_entry(write_gguf(ckpt, tmp_path / "m.gguf"))).config
    from_hf = ModelConfig.from_hf_dir(ckpt)
    assert from_gguf.rms_norm_eps == pytest.approx(from_hf.rms_norm_eps)  # stored as float32
    # eos / bos come from the GGUF's tokenizer section, not config.json
    same = dict(
        rms_norm_eps=from_hf.rms_norm_eps, eos_token_ids=from_hf.eos_token_ids, bos_token_id=from_hf.bos_token_id
    )
    assert dataclasses.replace(from_gguf, **same) == from_hf
    assert from_gguf.layer_types == LAYERS and from_gguf.partial_rotary_factor == 0.25


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_next"])
def test_f16_and_q8_0_files_stay_close_to_transformers(tmp_path, arch):
    """Rounding only (measured on these checkpoints: f16 max 0.013; Q8_0 max 0.31, mean 0.03)."""
    ckpt = _ckpt(tmp_path, arch)
    want = _hf_logits(ckpt)
    f16 = write_gguf(ckpt, tmp_path / "f16.gguf", f16=True)
    q8 = write_gguf(ckpt, tmp_path / "q8.gguf", quantize=("proj.weight", "in_proj_z.weight"))
    for path, max_err, mean_err, agree in ((f16, 5e-2, 5e-3, 0.95), (q8, 0.6, 0.06, 0.85)):
        got = _prefill_then_decode(_gguf_model(path), PROMPT, DECODE)
        err = (got - want).abs()
        assert err.max() < max_err and err.mean() < mean_err, path.name
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= agree, path.name


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_next"])
def test_q4_0_blocks_are_kept_packed_on_the_cpu(tmp_path, arch):
    """quantize = "auto" on the CPU: the attention and MLP matrices keep the file's Q4_0 blocks (the
    same logits as dequantizing them); the DeltaNet's, re-laid out by the converter, are packed again
    from their values (more rounding: only near)."""
    ckpt = _ckpt(tmp_path, arch)
    kept = write_gguf(ckpt, tmp_path / "kept.gguf", quantize=("mlp.down_proj.weight", "o_proj.weight"), qtype="Q4_0")
    packed = _gguf_model(kept, quantize="auto")
    assert type(packed.model.layers[1].mlp.down_proj).__name__ == "QuantLinear"
    dense = _prefill_then_decode(_gguf_model(kept), PROMPT, DECODE)
    assert (_prefill_then_decode(packed, PROMPT, DECODE) - dense).abs().max() < 2e-3

    every = write_gguf(ckpt, tmp_path / "q4.gguf", quantize=("proj.weight",), qtype="Q4_0")
    got, want = _prefill_then_decode(_gguf_model(every, quantize="auto"), PROMPT, DECODE), _hf_logits(ckpt)
    assert torch.corrcoef(torch.stack((got.flatten(), want.flatten())))[0, 1] > 0.85  # measured 0.89-0.90


def _meta(tmp_path: Path, arch: str) -> tuple[dict, bool, int]:
    f = GGUFFile(write_gguf(_ckpt(tmp_path, arch), tmp_path / "m.gguf"))
    return f.metadata(), "output.weight" in f.tensors, int(f.tensors["token_embd.weight"].shape[-1])


@pytest.mark.parametrize(
    "key",
    ["ssm.conv_kernel", "ssm.state_size", "ssm.group_count", "ssm.time_step_rank", "ssm.inner_size"]
    + ["rope.dimension_count", "attention.key_length", "block_count", "embedding_length"],
)
def test_a_missing_required_key_is_named(tmp_path, key):
    meta, has_output, vocab = _meta(tmp_path, "qwen3_5")
    del meta[f"qwen35.{key}"]
    with pytest.raises(UnsupportedModel, match=re.escape(f"'qwen35.{key}' is missing")):
        ModelConfig.from_gguf_fields(meta, has_output, vocab)


def test_multi_token_prediction_layers_are_not_counted(tmp_path):
    """The converter counts Qwen3.5's MTP block in block_count and says how many in
    nextn_predict_layers; we run the main layers only."""
    meta, has_output, vocab = _meta(tmp_path, "qwen3_5")
    meta.update({"qwen35.block_count": 5, "qwen35.nextn_predict_layers": 1})
    cfg = ModelConfig.from_gguf_fields(meta, has_output, vocab)
    assert cfg.num_layers == 4 and cfg.layer_types == LAYERS


def test_a_recurrent_layers_array_overrides_the_interval(tmp_path):
    """Newer llama.cpp reads a per-layer flag array first (any pattern, e.g. a pruned model's)."""
    meta, has_output, vocab = _meta(tmp_path, "qwen3_5")
    meta["qwen35.attention.recurrent_layers"] = [True, False, True, True]
    cfg = ModelConfig.from_gguf_fields(meta, has_output, vocab)
    assert cfg.layer_types == ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
    meta["qwen35.attention.recurrent_layers"] = [True, False]
    with pytest.raises(UnsupportedModel, match="recurrent_layers' has 2 flags for 4 layers"):
        ModelConfig.from_gguf_fields(meta, has_output, vocab)


def test_layer_pattern_defaults_to_every_fourth_layer_full(tmp_path):
    meta, has_output, vocab = _meta(tmp_path, "qwen3_next")
    del meta["qwen3next.full_attention_interval"]
    meta["qwen3next.block_count"] = 8
    cfg = ModelConfig.from_gguf_fields(meta, has_output, vocab)
    assert cfg.layer_types == (["linear_attention"] * 3 + ["full_attention"]) * 2


def test_a_qwen35_gguf_is_served_with_the_greedy_tokens_of_transformers(tmp_path):
    """Over HTTP, as an operator runs it: the .gguf path in models.toml, config, tokenizer and
    template from the file; the greedy reply equals transformers' greedy continuation."""
    import httpx

    from cortex.chat import prompt as chat_prompt
    from cortex.chat.tokenizer import token_bytes
    from tests.conftest import Server, tiny_models_toml

    ckpt = _ckpt(tmp_path, "qwen3_5")
    path = write_gguf(ckpt, tmp_path / "m.gguf")
    files = source.read(gguf_entry(path))
    ids = files.tokenizer.encode(chat_prompt.render(files.template, [{"role": "user", "content": "Hi"}], None, None))
    ref, want, limit = hf_hybrid_model(ckpt), [], files.tokenizer.vocab_size  # ids past the tokenizer's: never sampled
    with torch.no_grad():
        for _ in range(8):
            want.append(int(ref(torch.tensor([ids + want])).logits[0, -1, :limit].argmax()))

    server = Server(tmp_path / "srv", tiny_models_toml(path, "max_context = 256", model_id="g"), "")
    try:
        server.wait_healthy()
        body = {"model": "g", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
        body |= {"temperature": 0, "ignore_eos": True, "logprobs": True}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=300)
    finally:
        server.stop()
    assert r.status_code == 200, r.text
    got = [bytes(t["bytes"]) for t in r.json()["choices"][0]["logprobs"]["content"]]
    assert got == [token_bytes(files.tokenizer.tokenizer, t) for t in want]

"""GGUF models: weights dequantized at load (llama.cpp's q/k permutation undone), config and tokenizer
read from the metadata; and the real SmolLM2-135M GGUF."""

from __future__ import annotations

import pytest
import torch

from cortex.config import ModelEntry
from cortex.models import source
from tests.checkpoints import hf_model, make_checkpoint
from tests.conftest import train_tiny_tokenizer
from tests.gguf_writer import write_gguf
from workers.arch import model_class
from workers.kv_cache import LocalRunner
from workers.weights import WeightsError, load_weights


def gguf_entry(path) -> ModelEntry:
    """A catalogue entry for one local file, every other key its default."""
    return ModelEntry(
        id="m",
        path=path,
        source=None,
        tensor_parallel=1,
        devices=None,
        dtype="auto",
        residency_priority=100,
        pinned=False,
        preload=False,
        max_context=0,
    )


def _ckpt(tmp_path, arch, tied):
    path = make_checkpoint(tmp_path / "hf", arch, tied)
    train_tiny_tokenizer(path)
    return path


def _gguf_model(gguf_path):
    files = source.read(gguf_entry(gguf_path))
    model = model_class(files.config)(files.config)
    load_weights(model, "gguf", [str(gguf_path)])
    return model, files


def _logits(model, ids):
    return LocalRunner(model, torch.device("cpu")).step(0, ids, 0, all_logits=True)


IDS = [5, 9, 100, 7, 2, 44, 300, 8, 17, 33, 250]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_f32_gguf_matches_transformers_on_the_original_checkpoint(tmp_path, arch, tied):
    ckpt = _ckpt(tmp_path, arch, tied)
    model, files = _gguf_model(write_gguf(ckpt, tmp_path / "m.gguf"))
    assert files.format == "gguf" and files.config.arch == arch and files.config.tie_word_embeddings == tied
    with torch.no_grad():
        want = hf_model(ckpt)(torch.tensor([IDS])).logits[0]
    assert (_logits(model, IDS) - want).abs().max() < 1e-4


def test_q8_0_gguf_is_close_and_keeps_the_argmax(tmp_path):
    ckpt = _ckpt(tmp_path, "llama", False)
    model, _ = _gguf_model(write_gguf(ckpt, tmp_path / "q8.gguf", quantize=("proj.weight",)))
    with torch.no_grad():
        want = hf_model(ckpt)(torch.tensor([IDS])).logits[0]
    got = _logits(model, IDS)
    assert (got - want).abs().max() < 0.1
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8


def test_gguf_tokenizer_and_template_come_from_the_metadata(tmp_path):
    ckpt = _ckpt(tmp_path, "qwen3", True)
    files = source.read(gguf_entry(write_gguf(ckpt, tmp_path / "m.gguf")))
    from cortex.chat.tokenizer import from_hf_dir

    hf_tok = from_hf_dir(ckpt)
    text = "The capital of France is Paris. Hello, world!"
    assert files.tokenizer.encode(text) == hf_tok.encode(text)
    assert files.tokenizer.eos_token == "<|im_end|>"
    assert files.template.render([{"role": "user", "content": "x"}]).endswith("<|im_start|>assistant\n")


def test_a_truncated_gguf_is_a_clear_error(tmp_path):
    ckpt = _ckpt(tmp_path, "llama", True)
    good = write_gguf(ckpt, tmp_path / "m.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(source.ModelFilesError, match="bad.gguf"):
        source.read(gguf_entry(bad))


def test_a_gguf_missing_a_tensor_names_it(tmp_path):
    ckpt = _ckpt(tmp_path, "llama", True)
    path = write_gguf(ckpt, tmp_path / "m.gguf")
    files = source.read(gguf_entry(path))
    cfg = files.config
    bigger = type(cfg)(**{**cfg.to_dict(), "num_layers": cfg.num_layers + 1})
    with pytest.raises(WeightsError, match=r"blk\.2\."):
        load_weights(model_class(bigger)(bigger), "gguf", [str(path)])


@pytest.mark.slow
def test_smollm2_gguf_config_and_greedy_answer():
    from cortex.config import load

    files = source.read(load().catalogue.models[0])
    c = files.config
    assert (c.arch, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == ("llama", 30, 9, 3, 64)
    assert c.max_position_embeddings == 8192 and 2 in c.eos_token_ids and c.tie_word_embeddings
    model = model_class(c)(c)
    load_weights(model, files.format, [str(f) for f in files.files])
    prompt = files.tokenizer.encode(
        files.template.render([{"role": "user", "content": "What is the capital of France?"}])
    )
    run = LocalRunner(model, torch.device("cpu"))
    out = [int(run.step(0, prompt, 0).argmax())]
    while out[-1] != 2 and len(out) < 24:
        out.append(int(run.step(0, out[-1:], len(prompt) + len(out) - 1).argmax()))
    assert "Paris" in files.tokenizer.decode(out)

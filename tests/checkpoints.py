"""Real checkpoints made locally: tiny random Llama / Qwen3 written by HF transformers' save_pretrained,
with every weight re-randomised so logits are far from flat and any layout mistake changes argmax."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def tiny_config(arch: str, tied: bool, kv_heads: int = 2, vocab: int = 512, layers: int = 2):
    if arch == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=kv_heads,
            head_dim=32,  # 4*32 != 64 on purpose
            tie_word_embeddings=tied,
            rope_theta=1e6,
            max_position_embeddings=2048,
            bos_token_id=1,
            eos_token_id=2,
        )
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
        rope_theta=1e4,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
    )


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norms: around 1, not exactly 1
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def make_checkpoint(
    path: Path,
    arch: str,
    tied: bool,
    kv_heads: int = 2,
    seed: int = 0,
    vocab: int = 512,
    layers: int = 2,
    shard_size: str | None = None,
) -> Path:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, tied, kv_heads, vocab, layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    randomize(model, seed)
    if tied:
        model.tie_weights()
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def write_chatml_tokenizer_config(path: Path, eos: str = "<|im_end|>") -> None:
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": eos}))

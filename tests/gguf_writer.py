"""Write a tiny HF checkpoint as a GGUF file the way llama.cpp's converter lays it out: metadata keys,
tensor names, a gpt2-style tokenizer section and, for Llama only, q/k rows permuted for llama.cpp's
interleaved RoPE. Loading it back must undo all of that."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

from workers.gguf_file import gguf_name


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(ckpt: Path, out: Path, quantize: tuple[str, ...] = ()) -> Path:
    """``quantize``: suffixes of HF tensor names to store as Q8_0 instead of F32."""
    cfg = json.loads((ckpt / "config.json").read_text())
    arch = cfg["model_type"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    if cfg.get("head_dim"):
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    rope = cfg.get("rope_parameters") or {}
    w.add_rope_freq_base(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])

    tok = json.loads((ckpt / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv_: kv_[1])
    specials = {t["content"] for t in tok["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    merges = tok["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_eos_token_id(tok["model"]["vocab"]["<|im_end|>"])
    w.add_bos_token_id(tok["model"]["vocab"]["<|im_start|>"])
    w.add_add_bos_token(False)

    tensors = load_file(ckpt / "model.safetensors")
    for name, t in tensors.items():
        t = t.astype(np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            t = _permute(t, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            t = _permute(t, kv)
        if name.endswith(quantize) and t.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(gguf_name(name), gguf.quants.quantize(t, q8), raw_dtype=q8)
        else:
            w.add_tensor(gguf_name(name), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out

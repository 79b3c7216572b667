"""GGUF files: metadata as a plain dict, and the tensor names llama.cpp uses. Torch-free."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf

# Hugging Face parameter name (per layer, after "model.layers.N.") -> GGUF name (after "blk.N.")
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# Keys whose values are big arrays; kept out of the metadata dict unless asked for.
_BULK = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


def gguf_name(hf_name: str) -> str:
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    parts = hf_name.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in LAYER_NAMES:
        return f"blk.{parts[2]}.{LAYER_NAMES[parts[3]]}"
    raise KeyError(f"no GGUF name for parameter {hf_name!r}")


class GGUFFile:
    """An open GGUF file (memory-mapped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as exc:
            raise ValueError(f"{self.path}: not a readable GGUF file ({exc})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def metadata(self, include_bulk: bool = False) -> dict[str, Any]:
        out = {}
        for key, field in self.reader.fields.items():
            if key.startswith("GGUF.") or (key in _BULK and not include_bulk):
                continue
            out[key] = field.contents()
        return out

    def field(self, key: str) -> Any:
        f = self.reader.fields.get(key)
        return None if f is None else f.contents()

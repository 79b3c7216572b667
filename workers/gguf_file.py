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
    # mixture-of-experts MLPs (workers/arch/moe.py): the router, the routed experts merged into 3-D
    # tensors [experts, out, in] (llama.cpp's converter stacks the per-expert ones, and splits a fused
    # gate_up_proj into gate and up: ``EXPERT_PARTS`` lists what our stacked gate_up_proj is read
    # from), the shared expert and its gate
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.experts.gate_proj": "ffn_gate_exps.weight",
    "mlp.experts.up_proj": "ffn_up_exps.weight",
    "mlp.experts.gate_up_proj": "ffn_gate_up_exps.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}
# our stacked [experts, 2 * inter, hidden] gate_up_proj: one merged tensor (newer converters), else
# gate and up, concatenated along the rows
EXPERT_PARTS = ("mlp.experts.gate_proj", "mlp.experts.up_proj")
# Qwen3.5 / Qwen3-Next (our archs "qwen3_5", "qwen3_next"; llama.cpp's "qwen35", "qwen3next"): the
# names gguf's TensorNameMap gives these archs. Several tensors are also re-laid out or transformed
# by llama.cpp's converter; workers/weights.py undoes that (``HybridLayout``).
HYBRID_LAYER_NAMES = {
    **LAYER_NAMES,
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "linear_attn.in_proj_qkv.weight": "attn_qkv.weight",  # Qwen3.5; Qwen3-Next's in_proj_qkvz is
    "linear_attn.in_proj_z.weight": "attn_gate.weight",  # split into these two by the converter
    "linear_attn.in_proj_b.weight": "ssm_beta.weight",
    "linear_attn.in_proj_a.weight": "ssm_alpha.weight",
    "linear_attn.in_proj_ba.weight": "ssm_ba.weight",  # Qwen3-Next
    "linear_attn.conv1d.weight": "ssm_conv1d.weight",
    "linear_attn.A_log": "ssm_a",
    "linear_attn.dt_bias": "ssm_dt.bias",  # renamed dt_proj.bias by the converter first
    "linear_attn.norm.weight": "ssm_norm.weight",
    "linear_attn.out_proj.weight": "ssm_out.weight",
}
HYBRID_ARCHS = ("qwen3_5", "qwen3_next")
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# Keys whose values are big arrays; kept out of the metadata dict unless asked for.
_BULK = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


def gguf_name(hf_name: str, arch: str = "llama") -> str:
    """The GGUF name of a Hugging Face parameter of a model of ``arch`` (our ModelConfig.arch)."""
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    names = HYBRID_LAYER_NAMES if arch in HYBRID_ARCHS else LAYER_NAMES
    parts = hf_name.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in names:
        return f"blk.{parts[2]}.{names[parts[3]]}"
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

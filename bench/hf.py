"""HF transformers' twin of a cortex model: same config, same tensors. The reference for speed."""

from __future__ import annotations

import torch

from workers.arch.config import ModelConfig


def hf_twin(cfg: ModelConfig, state_dict: dict, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    cls, cfg_cls = (Qwen3ForCausalLM, Qwen3Config) if cfg.arch == "qwen3" else (LlamaForCausalLM, LlamaConfig)
    hf_cfg = cfg_cls(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    with torch.device(device):
        hf = cls(hf_cfg).to(dtype).eval()
    hf.load_state_dict(state_dict, strict=False)  # parameter names are the same; rotary buffers differ
    hf.tie_weights()
    return hf

"""ModelConfig: the shape of a decoder-only model, from a Hugging Face config.json or GGUF metadata.

Torch-free on purpose: the leader reads it to know context length and EOS without importing torch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHS = ("llama", "qwen3")


class UnsupportedModel(ValueError):
    """The files describe a model this build cannot run (architecture, rope type, ...)."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before RoPE
    rope_scaling: dict[str, Any] | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**data)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], generation_config: dict[str, Any] | None = None) -> ModelConfig:
        arch = cfg.get("model_type", "")
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedModel(f"model_type {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
        heads = cfg["num_attention_heads"]
        # transformers 5 writes rope_parameters; 4.x checkpoints keep rope_theta / rope_scaling at top level
        rope = cfg.get("rope_parameters") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        _check_rope(scaling)
        eos = _as_list((generation_config or {}).get("eos_token_id", cfg.get("eos_token_id")))
        return cls(
            arch=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            qk_norm=arch == "qwen3",
            rope_scaling=scaling,
            eos_token_ids=eos,
            bos_token_id=cfg.get("bos_token_id"),
        )

    @classmethod
    def from_hf_dir(cls, path: Path) -> ModelConfig:
        cfg = json.loads((path / "config.json").read_text())
        gen_path = path / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.exists() else None
        return cls.from_hf(cfg, gen)

    @classmethod
    def from_gguf_fields(cls, meta: dict[str, Any], has_output_weight: bool, vocab_size: int) -> ModelConfig:
        arch = meta.get("general.architecture", "")
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedModel(
                f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
            )

        def key(name: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{name}", default)

        hidden = key("embedding_length")
        heads = key("attention.head_count")
        scaling_type = key("rope.scaling.type")
        scaling = None
        if scaling_type and scaling_type != "none":
            scaling = {"rope_type": scaling_type, "factor": key("rope.scaling.factor", 1.0)}
        _check_rope(scaling)
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            arch=arch,
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=key("feed_forward_length"),
            num_layers=key("block_count"),
            num_heads=heads,
            num_kv_heads=key("attention.head_count_kv") or heads,
            head_dim=key("attention.key_length") or hidden // heads,
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            max_position_embeddings=key("context_length", 4096),
            tie_word_embeddings=not has_output_weight,
            qk_norm=arch == "qwen3",
            rope_scaling=scaling,
            eos_token_ids=[] if eos is None else [int(eos)],
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        )


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


_ROPE_TYPES = ("default", "linear", "llama3")


def _check_rope(scaling: dict[str, Any] | None) -> None:
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if kind not in _ROPE_TYPES:
        raise UnsupportedModel(f"rope scaling {kind!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")

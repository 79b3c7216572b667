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
# Hybrid linear-attention models (Hugging Face config.json only): model_type -> the arch we run.
# Qwen3.5 comes VLM-shaped ("qwen3_5", the text model under "text_config") or text-only.
HYBRID_ARCHS = {"qwen3_5": "qwen3_5", "qwen3_5_text": "qwen3_5", "qwen3_next": "qwen3_next"}
LAYER_TYPES = ("full_attention", "linear_attention")


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
    # Hybrid models (Qwen3.5, Qwen3-Next): each layer's token mixer, one of LAYER_TYPES; empty for
    # plain decoders (every layer full attention). Linear-attention layers are Gated DeltaNet layers
    # with a fixed-size state per sequence instead of a KV cache (workers/arch/deltanet.py).
    layer_types: list[str] = field(default_factory=list)
    partial_rotary_factor: float = 1.0  # RoPE turns only the first head_dim * factor dims of a head
    attn_output_gate: bool = False  # q_proj also yields a gate per head: out * sigmoid(gate) before o_proj
    linear_conv_kernel: int = 0  # depthwise causal conv over q, k, v; its state keeps kernel - 1 inputs
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0  # a multiple of the key heads (each key head serves a group)
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0

    @property
    def kv_layers(self) -> int:
        """How many layers keep keys and values in the paged KV cache."""
        return self.layer_types.count("full_attention") if self.layer_types else self.num_layers

    @property
    def linear_layers(self) -> int:
        """How many layers keep a recurrent state per sequence instead."""
        return self.layer_types.count("linear_attention")

    def state_slot_bytes(self, world_size: int, dtype: str) -> int:
        """Bytes one sequence's recurrent state takes on each rank (every linear-attention layer):
        the conv state in ``dtype`` plus the delta-rule state in float32. 0 for plain decoders."""
        if not self.linear_layers:
            return 0
        k_heads = self.linear_num_key_heads // world_size
        v_heads = self.linear_num_value_heads // world_size
        channels = 2 * k_heads * self.linear_key_head_dim + v_heads * self.linear_value_head_dim
        conv = channels * (self.linear_conv_kernel - 1) * {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
        delta = v_heads * self.linear_key_head_dim * self.linear_value_head_dim * 4
        return self.linear_layers * (conv + delta)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**data)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], generation_config: dict[str, Any] | None = None) -> ModelConfig:
        arch = cfg.get("model_type", "")
        if arch in HYBRID_ARCHS:
            return _hybrid_from_hf(cls, cfg, generation_config)
        if arch not in SUPPORTED_ARCHS:
            supported = ", ".join((*SUPPORTED_ARCHS, *HYBRID_ARCHS))
            raise UnsupportedModel(f"model_type {arch!r} is not supported (supported: {supported})")
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


def _hybrid_from_hf(cls, cfg: dict[str, Any], generation_config: dict[str, Any] | None) -> ModelConfig:
    """Qwen3.5 / Qwen3-Next: the text model's shape (under ``text_config`` in VLM-shaped files), its
    ``layer_types`` (derived from ``full_attention_interval`` when absent) and Gated DeltaNet sizes."""
    arch = HYBRID_ARCHS[cfg["model_type"]]
    text = dict(cfg.get("text_config") or cfg)
    for key in ("eos_token_id", "bos_token_id", "tie_word_embeddings"):  # the outer file's word wins
        if cfg.get(key) is not None:
            text[key] = cfg[key]
    if arch == "qwen3_next":
        _check_dense(text)
    layers = text["num_hidden_layers"]
    types = list(text.get("layer_types") or [])
    if not types:
        every = text.get("full_attention_interval", 4)
        types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(layers)]
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown or len(types) != layers:
        raise UnsupportedModel(f"layer_types {unknown or types} is not supported ({layers} layers of {LAYER_TYPES})")
    rope = text.get("rope_parameters") or {}
    base = cls.from_hf({**text, "model_type": "qwen3"}, generation_config)  # the fields Qwen3 shares
    return dataclasses.replace(
        base,
        arch=arch,
        layer_types=types,
        partial_rotary_factor=float(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))),
        attn_output_gate=bool(text.get("attn_output_gate", True)),
        linear_conv_kernel=text.get("linear_conv_kernel_dim", 4),
        linear_num_key_heads=text.get("linear_num_key_heads", 16),
        linear_num_value_heads=text.get("linear_num_value_heads", 32),
        linear_key_head_dim=text.get("linear_key_head_dim", 128),
        linear_value_head_dim=text.get("linear_value_head_dim", 128),
    )


def _check_dense(text: dict[str, Any]) -> None:
    """Qwen3-Next runs here only in its dense form: no layer with a mixture-of-experts MLP."""
    experts, step = text.get("num_experts", 512), text.get("decoder_sparse_step", 1)
    dense_only = set(text.get("mlp_only_layers") or [])
    moe = [i for i in range(text["num_hidden_layers"]) if i not in dense_only and experts > 0 and (i + 1) % step == 0]
    if moe:
        raise UnsupportedModel(f"qwen3_next with mixture-of-experts layers ({len(moe)} of them) is not supported yet")

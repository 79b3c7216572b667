"""ModelConfig: the shape of a decoder-only model, from a Hugging Face config.json or GGUF metadata.

Torch-free on purpose: the leader reads it to know context length and EOS without importing torch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHS = ("llama", "qwen3", "qwen3_moe")
# Hybrid linear-attention models (Hugging Face config.json only): model_type -> the arch we run.
# Qwen3.5 comes VLM-shaped ("qwen3_5", the text model under "text_config") or text-only.
HYBRID_ARCHS = {"qwen3_5": "qwen3_5", "qwen3_5_text": "qwen3_5", "qwen3_next": "qwen3_next"}
# Qwen3.5-MoE is Qwen3.5 with mixture-of-experts MLPs: the same hybrid arch, with num_experts set
HYBRID_ARCHS.update({"qwen3_5_moe": "qwen3_5", "qwen3_5_moe_text": "qwen3_5"})
LAYER_TYPES = ("full_attention", "linear_attention")
# The same hybrids in GGUF files: llama.cpp's architecture name -> the arch we run (Qwen3.5-MoE is
# llama.cpp's "qwen35moe"; Qwen3-Next's "qwen3next" is MoE as released, dense in our tests).
GGUF_HYBRID_ARCHS = {"qwen35": "qwen3_5", "qwen35moe": "qwen3_5", "qwen3next": "qwen3_next"}
# Plain decoders whose llama.cpp name differs from ours.
GGUF_ARCHS = {"qwen3moe": "qwen3_moe"}
# llama.cpp's mixture-of-experts archs whose graph always renormalises the top-k routing weights
# (build_moe_ffn's norm_w): qwen3moe, qwen3next, qwen35moe. A file may still say otherwise through
# ``{arch}.expert_weights_norm``; transformers' ``norm_topk_prob`` itself is not written.
GGUF_NORM_TOPK = ("qwen3moe", "qwen3next", "qwen35moe")


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
    # Mixture-of-experts MLPs (qwen3_moe; Qwen3-Next and Qwen3.5-MoE, run as the hybrid archs): a
    # router sends each token to num_experts_per_tok of num_experts SwiGLU experts
    # (workers/arch/moe.py). 0 experts: every MLP is dense (intermediate_size).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # each routed expert's
    shared_expert_intermediate_size: int = 0  # an expert every token takes, behind a sigmoid gate; 0: none
    norm_topk_prob: bool = False  # the top-k routing weights renormalised to sum to 1
    decoder_sparse_step: int = 1  # layer i is MoE iff (i + 1) % step == 0 and i not in mlp_only_layers
    mlp_only_layers: list[int] = field(default_factory=list)

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer ``i``'s MLP is a mixture of experts (transformers' rule, Qwen3MoeDecoderLayer)."""
        step = self.decoder_sparse_step or 1
        return self.num_experts > 0 and (i + 1) % step == 0 and i not in self.mlp_only_layers

    @property
    def moe_layers(self) -> int:
        """How many layers have a mixture-of-experts MLP."""
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

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
            qk_norm=arch in ("qwen3", "qwen3_moe"),
            rope_scaling=scaling,
            eos_token_ids=eos,
            bos_token_id=cfg.get("bos_token_id"),
            **_moe_from_hf(cfg, arch),
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
        if arch not in SUPPORTED_ARCHS and arch not in GGUF_HYBRID_ARCHS and arch not in GGUF_ARCHS:
            supported = ", ".join((*(a for a in SUPPORTED_ARCHS if a not in GGUF_ARCHS.values()), *GGUF_ARCHS))
            supported += ", " + ", ".join(GGUF_HYBRID_ARCHS)
            raise UnsupportedModel(f"GGUF architecture {arch!r} is not supported (supported: {supported})")
        key = _GGUFKeys(meta, arch)
        hidden = key.need("embedding_length")
        heads = key.need("attention.head_count")
        scaling_type = key.get("rope.scaling.type")
        scaling = None
        if scaling_type and scaling_type != "none":
            scaling = {"rope_type": scaling_type, "factor": key.get("rope.scaling.factor", 1.0)}
        _check_rope(scaling)
        eos = meta.get("tokenizer.ggml.eos_token_id")
        moe = _moe_from_gguf(key)
        base = cls(
            arch=GGUF_ARCHS.get(arch, arch),
            vocab_size=vocab_size,
            hidden_size=hidden,
            # a model with experts in every layer may have no dense size (Qwen3.5-MoE: none written)
            intermediate_size=key.get("feed_forward_length", 0) if moe else key.need("feed_forward_length"),
            num_layers=key.need("block_count"),
            num_heads=heads,
            num_kv_heads=key.get("attention.head_count_kv") or heads,
            head_dim=key.get("attention.key_length") or hidden // heads,
            rms_norm_eps=float(key.get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(key.get("rope.freq_base", 10000.0)),
            max_position_embeddings=key.get("context_length", 4096),
            tie_word_embeddings=not has_output_weight,
            qk_norm=arch in ("qwen3", "qwen3moe", *GGUF_HYBRID_ARCHS),
            rope_scaling=scaling,
            eos_token_ids=[] if eos is None else [int(eos)],
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            **moe,
        )
        return _hybrid_from_gguf(base, key) if arch in GGUF_HYBRID_ARCHS else base


class _GGUFKeys:
    """``{arch}.*`` metadata of a GGUF file; a required key that is missing is named in the error."""

    def __init__(self, meta: dict[str, Any], arch: str):
        self.meta, self.arch = meta, arch

    def get(self, name: str, default: Any = None) -> Any:
        return self.meta.get(f"{self.arch}.{name}", default)

    def need(self, name: str) -> Any:
        value = self.get(name)
        if value is None:
            raise UnsupportedModel(f"GGUF metadata key '{self.arch}.{name}' is missing (required for {self.arch})")
        return value


def _hybrid_from_gguf(base: ModelConfig, key: _GGUFKeys) -> ModelConfig:
    """Qwen3.5 / Qwen3-Next from the keys llama.cpp's converter writes (Qwen3NextModel.
    set_gguf_parameters): the Gated DeltaNet sizes under ``ssm.*``, the layer pattern as
    ``full_attention_interval``, partial RoPE as ``rope.dimension_count``. ``block_count`` also
    counts the multi-token-prediction layers (``nextn_predict_layers``) that we do not run."""
    layers = base.num_layers - key.get("nextn_predict_layers", 0)
    v_heads = key.need("ssm.time_step_rank")
    return dataclasses.replace(
        base,
        arch=GGUF_HYBRID_ARCHS[key.arch],
        num_layers=layers,
        head_dim=key.need("attention.key_length"),  # not hidden / heads in these models
        layer_types=_gguf_layer_types(key, layers),
        partial_rotary_factor=key.need("rope.dimension_count") / key.need("attention.key_length"),
        attn_output_gate=True,  # llama.cpp's qwen35 / qwen3next always read [query | gate] from attn_q
        linear_conv_kernel=key.need("ssm.conv_kernel"),
        linear_num_key_heads=key.need("ssm.group_count"),
        linear_num_value_heads=v_heads,
        linear_key_head_dim=key.need("ssm.state_size"),
        linear_value_head_dim=key.need("ssm.inner_size") // v_heads,
    )


def _moe_from_gguf(key: _GGUFKeys) -> dict[str, Any]:
    """The mixture-of-experts fields from the keys llama.cpp's converter writes (TextModel and
    Qwen2MoeModel.set_gguf_parameters): ``expert_count``, ``expert_used_count``,
    ``expert_feed_forward_length`` and, with a shared expert, ``expert_shared_feed_forward_length``.
    {} without ``expert_count`` (a dense model; qwen3moe must have it). As llama.cpp builds these
    archs, every layer has experts (no ``mlp_only_layers`` / ``decoder_sparse_step`` in the file)."""
    experts = key.need("expert_count") if key.arch == "qwen3moe" else key.get("expert_count")
    if not experts:
        return {}
    norm = key.get("expert_weights_norm")
    return dict(
        num_experts=int(experts),
        num_experts_per_tok=int(key.need("expert_used_count")),
        moe_intermediate_size=int(key.need("expert_feed_forward_length")),
        shared_expert_intermediate_size=int(key.get("expert_shared_feed_forward_length") or 0),
        norm_topk_prob=bool(key.arch in GGUF_NORM_TOPK if norm is None else norm),
    )


def _gguf_layer_types(key: _GGUFKeys, layers: int) -> list[str]:
    """As llama.cpp's loader reads them: a per-layer ``attention.recurrent_layers`` flag array when
    the file has one, else one full-attention layer every ``full_attention_interval`` (default 4)."""
    flags = key.get("attention.recurrent_layers")
    if flags is not None:
        if len(flags) < layers:
            raise UnsupportedModel(
                f"GGUF metadata key '{key.arch}.attention.recurrent_layers' has {len(flags)} flags for {layers} layers"
            )
        return ["linear_attention" if f else "full_attention" for f in flags[:layers]]
    every = key.get("full_attention_interval", 4)
    return ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(layers)]


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
    layers = text["num_hidden_layers"]
    types = list(text.get("layer_types") or [])
    if not types:
        every = text.get("full_attention_interval", 4)
        types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(layers)]
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown or len(types) != layers:
        raise UnsupportedModel(f"layer_types {unknown or types} is not supported ({layers} layers of {LAYER_TYPES})")
    rope = text.get("rope_parameters") or {}
    # the fields Qwen3 shares (Qwen3.5-MoE has no dense MLP, so no intermediate_size)
    base = cls.from_hf({"intermediate_size": 0, **text, "model_type": "qwen3"}, generation_config)
    return dataclasses.replace(
        base,
        **_moe_from_hf(text, cfg["model_type"]),
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


# transformers' default expert counts, for a config.json that leaves it out
_MOE_EXPERTS = {"qwen3_moe": 128, "qwen3_next": 512, "qwen3_5_moe": 256, "qwen3_5_moe_text": 256}


def _moe_from_hf(cfg: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The mixture-of-experts fields of a Qwen3-MoE, Qwen3-Next or Qwen3.5-MoE text config ({} for
    other models). transformers 5 writes Qwen3-MoE's expert count as ``num_local_experts``;
    Qwen3.5-MoE has no ``norm_topk_prob``: its router always renormalises."""
    if model_type not in _MOE_EXPERTS:
        return {}
    experts = cfg.get("num_experts", cfg.get("num_local_experts", _MOE_EXPERTS[model_type]))
    if not experts:
        return {}
    always_norm = model_type.startswith("qwen3_5_moe")
    return dict(
        num_experts=int(experts),
        num_experts_per_tok=int(cfg.get("num_experts_per_tok", 8)),
        moe_intermediate_size=int(cfg["moe_intermediate_size"]),
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0),
        norm_topk_prob=always_norm or bool(cfg.get("norm_topk_prob", model_type == "qwen3_next")),
        decoder_sparse_step=int(cfg.get("decoder_sparse_step") or 1),
        mlp_only_layers=[int(i) for i in cfg.get("mlp_only_layers") or []],
    )

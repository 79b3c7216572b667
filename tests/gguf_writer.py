"""Write a tiny HF checkpoint as a GGUF file the way llama.cpp's converter lays it out: metadata keys,
tensor names, a gpt2-style tokenizer section and, for Llama only, q/k rows permuted for llama.cpp's
interleaved RoPE; for Qwen3.5 / Qwen3-Next the converter's own keys, names and value transforms
(``_hybrid_keys``, ``_hybrid_tensors``). Loading it back must undo all of that."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

from workers.gguf_file import gguf_name


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(ckpt: Path, out: Path, quantize: tuple[str, ...] = (), f16: bool = False, qtype: str = "Q8_0") -> Path:
    """``quantize``: suffixes of HF matrix names to store as ``qtype`` (Q8_0, Q4_0, Q4_1) instead of
    F32; ``f16``: the other matrices as F16 (norms, biases, the conv and other small tensors stay
    F32, as llama.cpp keeps them)."""
    cfg = json.loads((ckpt / "config.json").read_text())
    arch = cfg["model_type"]
    if arch in HYBRID_ARCHS:
        return _write_hybrid(ckpt, out, cfg, quantize, f16, qtype)
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

    _add_tokenizer(w, ckpt)

    tensors = load_file(ckpt / "model.safetensors")
    for name, t in tensors.items():
        t = t.astype(np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            t = _permute(t, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            t = _permute(t, kv)
        _add_tensor(w, gguf_name(name), t, name.endswith(quantize) and t.ndim == 2)
    return _finish(w, out)


def _add_tokenizer(w: gguf.GGUFWriter, ckpt: Path) -> None:
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


def _add_tensor(w: gguf.GGUFWriter, name: str, t: np.ndarray, quant: bool, f16: bool = False, qtype="Q8_0") -> None:
    if quant:
        q = gguf.GGMLQuantizationType[qtype]
        w.add_tensor(name, gguf.quants.quantize(t, q), raw_dtype=q)
    else:
        w.add_tensor(name, t.astype(np.float16) if f16 else t)


def _finish(w: gguf.GGUFWriter, out: Path) -> Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# Qwen3.5 / Qwen3-Next, following llama.cpp's convert_hf_to_gguf.py at ggml-org/llama.cpp 0024aa74:
# Qwen3NextModel (set_gguf_parameters, modify_tensors), and for Qwen3.5 (Qwen3_5TextModel) first
# _LinearAttentionVReorderBase.modify_tensors; tensor names from gguf's TensorNameMap for the arch.
HYBRID_ARCHS = {"qwen3_5": gguf.MODEL_ARCH.QWEN35, "qwen3_5_text": gguf.MODEL_ARCH.QWEN35}
HYBRID_ARCHS["qwen3_next"] = gguf.MODEL_ARCH.QWEN3NEXT
# gguf has no dense FFN names for qwen3next (llama.cpp converts only the MoE Qwen3-Next): we write a
# dense one under the names every other arch uses, which is what our loader reads.
DENSE_FFN = {"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _write_hybrid(ckpt: Path, out: Path, cfg: dict, quantize: tuple[str, ...], f16: bool, qtype: str) -> Path:
    text = cfg.get("text_config") or cfg
    arch = HYBRID_ARCHS[cfg["model_type"]]
    w = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    _hybrid_keys(w, text)
    _add_tokenizer(w, ckpt)
    names = gguf.get_tensor_name_map(arch, text["num_hidden_layers"])
    for hf, t in _hybrid_tensors(load_file(ckpt / "model.safetensors"), text, arch):
        # TextModel.map_tensor_name: ".weight" / ".bias" kept as suffixes; A_log has none (ssm_a)
        base, suffix = hf, ""
        if hf.endswith((".weight", ".bias")):
            base, _, leaf = hf.rpartition(".")
            suffix = "." + leaf
        matrix = t.ndim == 2 and "conv1d" not in hf
        name = (names.get_name(base) or _dense_ffn(base)) + suffix
        _add_tensor(w, name, t, matrix and hf.endswith(quantize), matrix and f16, qtype)
    return _finish(w, out)


def _dense_ffn(base: str) -> str:
    layer, _, rest = base.rpartition(".mlp.")
    return f"blk.{layer.rsplit('.', 1)[1]}.{DENSE_FFN['mlp.' + rest]}"


def _hybrid_keys(w: gguf.GGUFWriter, text: dict) -> None:
    """TextModel.set_gguf_parameters, then Qwen3NextModel's ssm.* keys, full-attention interval and
    partial-RoPE dimension count."""
    rope = text.get("rope_parameters") or {}
    w.add_block_count(text["num_hidden_layers"])
    w.add_context_length(text["max_position_embeddings"])
    w.add_embedding_length(text["hidden_size"])
    w.add_feed_forward_length(text["intermediate_size"])
    w.add_head_count(text["num_attention_heads"])
    w.add_head_count_kv(text["num_key_value_heads"])
    w.add_rope_freq_base(rope.get("rope_theta", text.get("rope_theta")))
    w.add_layer_norm_rms_eps(text["rms_norm_eps"])
    w.add_key_length(text["head_dim"])
    w.add_value_length(text["head_dim"])
    w.add_ssm_conv_kernel(text["linear_conv_kernel_dim"])
    w.add_ssm_state_size(text["linear_key_head_dim"])
    w.add_ssm_group_count(text["linear_num_key_heads"])
    w.add_ssm_time_step_rank(text["linear_num_value_heads"])
    w.add_ssm_inner_size(text["linear_value_head_dim"] * text["linear_num_value_heads"])
    w.add_full_attention_interval(_interval(text))
    partial = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
    w.add_rope_dimension_count(int(text["head_dim"] * partial))


def _interval(text: dict) -> int:
    """The converter writes ``full_attention_interval`` (default 4) and llama.cpp derives the layer
    pattern from it; a checkpoint whose ``layer_types`` that cannot say is refused here."""
    types = text["layer_types"]
    for every in range(1, len(types) + 1):
        if types == ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(len(types))]:
            return every
    raise ValueError(f"layer_types {types} are not one full-attention layer every N")


def _hybrid_tensors(tensors: dict[str, np.ndarray], text: dict, arch) -> list[tuple[str, np.ndarray]]:
    """(HF-style name the converter maps, value as the converter writes it) for the text model."""
    out = []
    for name, t in tensors.items():
        if name.startswith(("model.visual.", "mtp.")):  # the vision tower goes to an mmproj file
            continue
        name = name.replace("language_model.", "")  # Qwen2MoeModel.modify_tensors
        t = t.astype(np.float32)
        if arch == gguf.MODEL_ARCH.QWEN35 and "linear_attn." in name:
            t = _v_heads_tiled(name, t, text)
        out += _qwen3next_modify(name, t, text)
    return out


def _reorder_v_heads(t: np.ndarray, axis: int, k_heads: int, per_k: int, head_dim: int) -> np.ndarray:
    """_LinearAttentionVReorderBase._reorder_v_heads: grouped by key head -> tiled."""
    shape = t.shape
    grouped = t.reshape(*shape[:axis], k_heads, per_k, head_dim, *shape[axis + 1 :])
    return grouped.swapaxes(axis, axis + 1).reshape(shape)


def _v_heads_tiled(name: str, t: np.ndarray, text: dict) -> np.ndarray:
    k, v = text["linear_num_key_heads"], text["linear_num_value_heads"]
    if k == v:
        return t
    dk, dv, r = text["linear_key_head_dim"], text["linear_value_head_dim"], v // k
    qk = 2 * k * dk
    if ".in_proj_qkv." in name:
        return np.concatenate((t[:qk], _reorder_v_heads(t[qk:], 0, k, r, dv)))
    if ".in_proj_z." in name:
        return _reorder_v_heads(t, 0, k, r, dv)
    if ".in_proj_b." in name or ".in_proj_a." in name:
        return _reorder_v_heads(t, 0, k, r, 1)
    if ".A_log" in name or ".dt_bias" in name:
        return _reorder_v_heads(t, 0, k, r, 1)
    if ".conv1d" in name:
        t = t.squeeze()
        return np.concatenate((t[:qk], _reorder_v_heads(t[qk:], 0, k, r, dv)))
    if ".out_proj." in name:
        return _reorder_v_heads(t, 1, k, r, dv)
    return t


def _qwen3next_modify(name: str, t: np.ndarray, text: dict) -> list[tuple[str, np.ndarray]]:
    if name.endswith(".A_log"):
        t = -np.exp(t)
    elif name.endswith(".dt_bias"):
        name = name.removesuffix(".dt_bias") + ".dt_proj.bias"
    elif "conv1d" in name:
        t = t.squeeze()
    elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        t = t + 1
    if "in_proj_qkvz.weight" not in name:
        return [(name, t)]
    # per key head [q, k, v group, z group] -> [all q | all k | all v] (attn_qkv) and all z (attn_gate)
    k, dk = text["linear_num_key_heads"], text["linear_key_head_dim"]
    group = text["linear_num_value_heads"] // k * text["linear_value_head_dim"]
    per_head = t.reshape(k, 2 * dk + 2 * group, -1)
    q, key, v, z = np.split(per_head, np.cumsum([dk, dk, group]), axis=1)
    hidden = t.shape[1]
    qkv = np.concatenate([x.reshape(-1, hidden) for x in (q, key, v)])
    base = name.removesuffix(".in_proj_qkvz.weight")
    return [(f"{base}.in_proj_qkv.weight", qkv), (f"{base}.in_proj_z.weight", z.reshape(-1, hidden))]

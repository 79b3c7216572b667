"""Write a tiny HF checkpoint as a GGUF file the way llama.cpp's converter lays it out: metadata keys,
tensor names, a gpt2-style tokenizer section and, for Llama only, q/k rows permuted for llama.cpp's
interleaved RoPE; for Qwen3.5 / Qwen3-Next the converter's own keys, names and value transforms
(``_hybrid_keys``, ``_hybrid_tensors``); for mixture-of-experts models (Qwen3-MoE, Qwen3-Next,
Qwen3.5-MoE) its expert keys and its experts merged into 3-D tensors (``_moe_keys``,
``_merge_experts``). Loading it back must undo all of that."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
from safetensors.torch import load_file

from workers.gguf_file import gguf_name


def _tensors(ckpt: Path) -> dict[str, np.ndarray]:
    """The checkpoint's tensors as float32 arrays (numpy has no bfloat16, the dtype of
    bench/hybrid.py's model; the converter too computes in float32 before writing)."""
    return {name: t.float().numpy() for name, t in load_file(ckpt / "model.safetensors").items()}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    ckpt: Path,
    out: Path,
    quantize: tuple[str, ...] = (),
    f16: bool = False,
    qtype: str = "Q8_0",
    merged_gate_up: bool = False,
) -> Path:
    """``quantize``: suffixes of HF matrix names to store as ``qtype`` (Q8_0, Q4_0, Q4_1) instead of
    F32; ``f16``: the other matrices as F16 (norms, biases, the conv and other small tensors stay
    F32, as llama.cpp keeps them); ``merged_gate_up``: the hybrids' experts' gate and up as one
    ``ffn_gate_up_exps`` tensor (a name gguf has for qwen3next / qwen35moe) instead of two."""
    cfg = json.loads((ckpt / "config.json").read_text())
    arch = cfg["model_type"]
    if arch in HYBRID_ARCHS:
        return _write_hybrid(ckpt, out, cfg, quantize, f16, qtype, merged_gate_up)
    if arch == "qwen3_moe":
        return _write_qwen3moe(ckpt, out, cfg, quantize, f16, qtype)
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

    _add_tokenizer(w, ckpt, cfg["vocab_size"])

    tensors = _tensors(ckpt)
    for name, t in tensors.items():
        t = t.astype(np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            t = _permute(t, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            t = _permute(t, kv)
        _add_tensor(w, gguf_name(name), t, name.endswith(quantize) and t.ndim == 2)
    return _finish(w, out)


def _write_qwen3moe(ckpt: Path, out: Path, cfg: dict, quantize: tuple[str, ...], f16: bool, qtype: str) -> Path:
    """Qwen3MoeModel (via Qwen2MoeModel): Qwen3's keys and names (no q/k permutation), the expert
    keys, every layer's experts merged; names from gguf's tensor map for qwen3moe."""
    arch = gguf.MODEL_ARCH.QWEN3MOE
    w = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    rope = cfg.get("rope_parameters") or {}
    w.add_rope_freq_base(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    _moe_keys(w, cfg)
    _add_tokenizer(w, ckpt, cfg["vocab_size"])
    names = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    tensors = [(n, t.astype(np.float32)) for n, t in _tensors(ckpt).items()]
    for hf, t in _merge_experts(tensors):
        _add_tensor(w, _mapped(names, hf), t, _quantized(hf, t, quantize), _f16(hf, t, f16), qtype)
    return _finish(w, out)


def _moe_keys(w: gguf.GGUFWriter, cfg: dict) -> None:
    """TextModel.set_gguf_parameters' expert_count / expert_used_count, then Qwen2MoeModel's expert
    feed-forward lengths. ``norm_topk_prob`` is not written: llama.cpp's graphs for these archs
    always renormalise."""
    experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    if experts is None:
        return
    w.add_expert_count(experts)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if cfg.get("shared_expert_intermediate_size") is not None:
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])


_PER_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")


def _merge_experts(tensors: list[tuple[str, np.ndarray]], merged_gate_up: bool = False) -> list[tuple[str, np.ndarray]]:
    """Qwen2MoeModel.modify_tensors: each layer's per-expert ``experts.{e}.{gate,up,down}_proj``
    stacked into ``experts.{gate,up,down}_proj.weight`` [experts, out, in]; a fused
    ``experts.gate_up_proj`` [experts, 2 * inter, hidden] split into gate and up; a fused
    ``experts.down_proj`` renamed with ``.weight``. The rest unchanged, in order."""
    out, groups = [], {}
    for name, t in tensors:
        m = _PER_EXPERT.fullmatch(name)
        if m:
            groups.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = t
        elif name.endswith(".mlp.experts.gate_up_proj") and merged_gate_up:
            out.append((name + ".weight", t))
        elif name.endswith(".mlp.experts.gate_up_proj"):
            gate, up = np.split(t, 2, axis=1)
            out += [
                (name.replace("gate_up_proj", "gate_proj.weight"), gate),
                (name.replace("gate_up_", "up_") + ".weight", up),
            ]
        elif name.endswith(".mlp.experts.down_proj"):
            out.append((name + ".weight", t))
        else:
            out.append((name, t))
    for prefix, parts in groups.items():
        for part in ("down", "gate", "up"):  # the converter's order
            stacked = np.stack([parts[part][e] for e in sorted(parts[part])])
            out.append((f"{prefix}.{part}_proj.weight", stacked))
    return out


def _mapped(names, hf: str) -> str:
    """TextModel.map_tensor_name: ".weight" / ".bias" kept as suffixes; A_log has none (ssm_a)."""
    base, suffix = hf, ""
    if hf.endswith((".weight", ".bias")):
        base, _, leaf = hf.rpartition(".")
        suffix = "." + leaf
    return (names.get_name(base) or _dense_ffn(base)) + suffix


# what llama.cpp keeps in F32 whatever the file type: the routers (ffn_gate_inp, ffn_gate_inp_shexp)
_KEEP_F32 = (".mlp.gate.weight", ".shared_expert_gate.weight")


def _quantized(hf: str, t: np.ndarray, quantize: tuple[str, ...]) -> bool:
    return t.ndim in (2, 3) and "conv1d" not in hf and not hf.endswith(_KEEP_F32) and hf.endswith(quantize)


def _f16(hf: str, t: np.ndarray, f16: bool) -> bool:
    return f16 and t.ndim in (2, 3) and "conv1d" not in hf and not hf.endswith(_KEEP_F32)


def _add_tokenizer(w: gguf.GGUFWriter, ckpt: Path, rows: int = 0) -> None:
    """The converter's gpt2 vocabulary (TextModel.get_vocab_base): the BPE ranks and the added tokens
    by id, special ones CONTROL and others USER_DEFINED, and, up to ``rows`` (the embedding's, the
    config's vocab_size), ``[PAD{i}]`` UNUSED entries for ids the tokenizer lacks: llama.cpp
    requires as many tokens as embedding rows (Qwen3.5: 248,077 tokens, 248,320 rows)."""
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    by_id = {i: (t, gguf.TokenType.NORMAL) for t, i in tok["model"]["vocab"].items()}
    for t in tok["added_tokens"]:
        by_id[t["id"]] = (t["content"], gguf.TokenType.CONTROL if t["special"] else gguf.TokenType.USER_DEFINED)
    entries = [by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(max(rows, max(by_id) + 1))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in entries])
    w.add_token_types([int(ty) for _, ty in entries])
    merges = tok["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    ids = {t: i for i, (t, _) in enumerate(entries)}
    w.add_eos_token_id(ids["<|im_end|>"])
    w.add_bos_token_id(ids["<|im_start|>"])
    w.add_add_bos_token(False)


def _add_tensor(w: gguf.GGUFWriter, name: str, t: np.ndarray, quant: bool, f16: bool = False, qtype="Q8_0") -> None:
    if quant:
        q = gguf.GGMLQuantizationType[qtype]
        try:
            w.add_tensor(name, gguf.quants.quantize(t, q), raw_dtype=q)
            return
        except gguf.QuantError:  # rows not a whole number of blocks: the converter falls back to F16
            f16 = True
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
HYBRID_ARCHS |= {"qwen3_5_moe": gguf.MODEL_ARCH.QWEN35MOE, "qwen3_5_moe_text": gguf.MODEL_ARCH.QWEN35MOE}
# gguf has no dense FFN names for qwen3next (llama.cpp converts only the MoE Qwen3-Next): we write a
# dense one under the names every other arch uses, which is what our loader reads.
DENSE_FFN = {"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _write_hybrid(
    ckpt: Path, out: Path, cfg: dict, quantize: tuple[str, ...], f16: bool, qtype: str, merged_gate_up: bool = False
) -> Path:
    text = cfg.get("text_config") or cfg
    arch = HYBRID_ARCHS[cfg["model_type"]]
    w = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    _hybrid_keys(w, text)
    _add_tokenizer(w, ckpt, text["vocab_size"])
    names = gguf.get_tensor_name_map(arch, text["num_hidden_layers"])
    for hf, t in _merge_experts(_hybrid_tensors(_tensors(ckpt), text, arch), merged_gate_up):
        _add_tensor(w, _mapped(names, hf), t, _quantized(hf, t, quantize), _f16(hf, t, f16), qtype)
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
    if "intermediate_size" in text:  # none in Qwen3.5-MoE (every MLP a mixture of experts)
        w.add_feed_forward_length(text["intermediate_size"])
    w.add_head_count(text["num_attention_heads"])
    w.add_head_count_kv(text["num_key_value_heads"])
    w.add_rope_freq_base(rope.get("rope_theta", text.get("rope_theta")))
    _moe_keys(w, text)
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
    if w.arch in (gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN35], gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN35MOE]):
        # Qwen3.5's multimodal RoPE sections (pairs of rotary dims per position component), which
        # llama.cpp requires; for text all components are the token's position, so any split that
        # covers the rotary dims is plain RoPE (a config without mrope_section gets Qwen's 11:11:10)
        pairs = int(text["head_dim"] * partial) // 2
        sections = rope.get("mrope_section") or [pairs - 2 * (pairs // 3), pairs // 3, pairs // 3]
        w.add_rope_dimension_sections([*sections, 0][:4])


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
        if arch in (gguf.MODEL_ARCH.QWEN35, gguf.MODEL_ARCH.QWEN35MOE) and "linear_attn." in name:
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

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


# Qwen3.5 / Qwen3-Next (hybrid): two kinds of layer, both repeated, the last one linear
HYBRID_LAYERS = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]


def tiny_hybrid_text_config(tied: bool, vocab: int = 512, layer_types: list[str] | None = None) -> dict:
    """The text model's shape: 2 key heads of 16 serving 4 value heads of 24 (k and v widths differ,
    so a mix-up of the two fails), full attention with 4 query heads of 32, RoPE on 8 of them."""
    return dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=len(layer_types or HYBRID_LAYERS),
        layer_types=list(layer_types or HYBRID_LAYERS),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=24,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25},
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )


def hybrid_randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """``randomize``, then what the hybrid layers need to be tested hard: zero-centred norms
    (stored as w, applied as 1 + w) around 0, and decays near 1 (exp(g), g = -exp(A_log) *
    softplus(a + dt_bias)) so the recurrent state remembers many tokens back."""
    randomize(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.02, 0.6, generator=g).log())
            elif name.endswith("dt_bias"):
                p.copy_(-1.5 + 0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("norm.weight") and "linear_attn" not in name and "visual" not in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def make_hybrid_checkpoint(
    path: Path,
    arch: str = "qwen3_5",
    vlm: bool = False,
    tied: bool = False,
    seed: int = 0,
    vocab: int = 512,
    layer_types: list[str] | None = None,
) -> Path:
    """A tiny random Qwen3.5 (text-only ``Qwen3_5ForCausalLM``, or with ``vlm`` the
    ``Qwen3_5ForConditionalGeneration`` layout with a one-block vision tower) or dense Qwen3-Next."""
    text = tiny_hybrid_text_config(tied, vocab, layer_types)
    torch.manual_seed(seed)
    if arch == "qwen3_next":
        from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

        model = Qwen3NextForCausalLM(Qwen3NextConfig(**text, num_experts=0))
    elif vlm:
        from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
        model = Qwen3_5ForConditionalGeneration(
            Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=tied)
        )
    else:
        from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

        model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**text))
    hybrid_randomize(model.float(), seed)
    if tied:
        model.tie_weights()
    model.save_pretrained(path)
    return path


def hf_hybrid_model(path: Path):
    """The checkpoint in transformers, by the class that wrote it."""
    import transformers

    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch).from_pretrained(path, dtype=torch.float32).eval()


# Qwen3.5's vocabulary: 248,044 ranks and 33 added tokens; the embedding has 248,320 rows
QWEN3_5_VOCAB = 248320


def make_qwen3_5_chat_checkpoint(path: Path, tokenizer_json: Path, template: str, seed: int = 0) -> Path:
    """A tiny random Qwen3.5 that reads and writes the real Qwen3.5 vocabulary (``tokenizer_json``,
    tests/qwen_tok.py) and chats with ``template``; it ends its turn with ``<|im_end|>``."""
    import shutil

    make_hybrid_checkpoint(path, vocab=QWEN3_5_VOCAB, tied=True, seed=seed)
    shutil.copyfile(tokenizer_json, path / "tokenizer.json")
    eos = json.loads(tokenizer_json.read_text())["added_tokens"]
    eos_id = next(t["id"] for t in eos if t["content"] == "<|im_end|>")
    config = json.loads((path / "config.json").read_text())
    config.update(eos_token_id=eos_id, bos_token_id=None)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "eos_token": "<|im_end|>", "add_bos_token": False})
    )
    return path


# -- mixture of experts (workers/arch/moe.py) ----------------------------------------------------------

# Each kind's experts: (count, top-k, per-expert intermediate size, shared expert's; 0: none)
MOE_SHAPES = {"qwen3_moe": (16, 4, 32, 0), "qwen3_next": (8, 2, 32, 48), "qwen3_5_moe": (8, 2, 32, 48)}


def make_moe_checkpoint(
    path: Path,
    arch: str = "qwen3_moe",
    seed: int = 0,
    vocab: int = 512,
    fused: bool = False,
    **moe: object,
) -> Path:
    """A tiny random mixture-of-experts model written by ``save_pretrained`` (per-expert tensors):
    ``qwen3_moe`` (``Qwen3MoeForCausalLM``, 4 layers, layer 1 dense through ``mlp_only_layers``),
    ``qwen3_next`` (``Qwen3NextForCausalLM``, hybrid layers, layer 2 dense) or ``qwen3_5_moe``
    (``Qwen3_5MoeForConditionalGeneration``, VLM-shaped, every layer MoE). ``moe`` overrides config
    keys (``decoder_sparse_step``, ``norm_topk_prob``, ...); ``fused`` rewrites the experts as
    transformers 5 holds them (``experts.gate_up_proj`` / ``experts.down_proj``)."""
    experts, top_k, inter, shared = MOE_SHAPES[arch]
    common = dict(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=inter)
    torch.manual_seed(seed)
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        base = tiny_config("qwen3", tied=False, vocab=vocab, layers=4).to_dict()
        keep = {k: base[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads")}
        cfg = dict(keep, num_hidden_layers=4, num_key_value_heads=2, head_dim=32, bos_token_id=1, eos_token_id=2)
        cfg |= common | dict(norm_topk_prob=True, mlp_only_layers=[1], max_position_embeddings=2048) | moe
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**cfg))
    else:
        text = tiny_hybrid_text_config(tied=False, vocab=vocab) | common
        text |= dict(shared_expert_intermediate_size=shared, **moe)
        if arch == "qwen3_next":
            from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

            model = Qwen3NextForCausalLM(Qwen3NextConfig(**({"mlp_only_layers": [2]} | text)))
        else:
            from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

            text.pop("intermediate_size")  # no dense MLP in Qwen3.5-MoE
            vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
            model = Qwen3_5MoeForConditionalGeneration(Qwen3_5MoeConfig(text_config=text, vision_config=vision))
    (randomize if arch == "qwen3_moe" else hybrid_randomize)(model.float(), seed)  # plain or zero-centred norms
    model.save_pretrained(path)
    if fused:
        fuse_experts(path / "model.safetensors")
    return path


def fuse_experts(file: Path) -> None:
    """Rewrite per-expert tensors (``mlp.experts.{e}.{gate,up,down}_proj.weight``) as the stacked
    ``mlp.experts.gate_up_proj`` [experts, 2 * inter, hidden] and ``mlp.experts.down_proj``
    [experts, hidden, inter] that transformers 5 holds in memory."""
    import re

    from safetensors.torch import load_file, save_file

    weights = load_file(file)
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name in list(weights):
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(\w+)_proj\.weight", name)
        if m:
            groups.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = weights.pop(name)
    for prefix, experts in groups.items():
        order = [experts[e] for e in sorted(experts)]
        weights[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat((e["gate"], e["up"])) for e in order])
        weights[f"{prefix}.down_proj"] = torch.stack([e["down"] for e in order])
    save_file(weights, file, metadata={"format": "pt"})

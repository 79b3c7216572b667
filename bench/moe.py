"""Decode speed of a mixture-of-experts model: cortex vs transformers on the same weights, and vs a
dense model with the same active parameters.

    .venv/bin/python bench/moe.py [--quick] [--steps 32] [--threads N] [--rounds 3]

The model is a random Qwen3-MoE with a realistic router (128 experts, 8 per token, as Qwen3-30B-A3B)
and a small hidden size so that it fits anywhere: 8 layers, hidden 256, 4 query / 2 KV heads of 64,
each expert's intermediate size 128 (Qwen3-30B-A3B's 768 / 2048 ratio, about), vocabulary 8192.
transformers' ``Qwen3MoeForCausalLM`` writes it with ``save_pretrained`` (per-expert tensors) into a
temporary directory; cortex loads that file, transformers keeps its own copy: the same values.

What runs (both float32 on the CPU, same thread count, greedy):
- cortex: the model driven directly by ``workers.kv_cache.LocalRunner`` (the worker's forward over
  the paged KV cache, the grouped expert compute of workers/arch/moe.py; no RPC, no HTTP, no
  sampling beyond argmax);
- transformers: its forward with its KV cache, one token per sequence per step, with its default
  experts implementation (printed);
- dense: a Qwen3 of the same shape whose MLP has ``top_k * moe_intermediate_size`` features, so a
  token multiplies by as many MLP weights as in the MoE model (the router aside), run by cortex;
- int8 / int4: the MoE model loaded by cortex with ``quantize = "int8"`` / ``"int4"`` (every linear
  and every expert packed, one packed layer per expert, workers/quant.py: what a Q8_0 / Q4_0 GGUF
  gets on the CPU), so about 1/3.5 / 1/5 of the float32 bytes (the logits differ by the rounding).
  Their decode steps run every layer, router and experts included, in one native call (decode.c,
  moe.c); prefill steps run each layer's experts in one call (moe.c).

At 1 and 16 streams: prompts of 32 tokens prefilled first (not timed), then ``--steps`` decode steps
of every stream together; tokens/s = streams * steps / time, the best of ``--rounds`` rounds, rounds
alternating between engines. ``--quick``: 2 layers, hidden 128, fewer steps: a smoke test.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.checkpoints import randomize  # noqa: E402
from workers.arch import ModelConfig, model_class  # noqa: E402
from workers.kv_cache import LocalRunner  # noqa: E402
from workers.weights import load_weights  # noqa: E402

FULL = dict(layers=8, hidden=256, heads=4, kv_heads=2, head_dim=64, expert_inter=128, vocab=8192)
QUICK = dict(FULL, layers=2, hidden=128, expert_inter=64)
EXPERTS, TOP_K, PROMPT = 128, 8, 32


def hf_config(shape: dict, moe: bool):
    from transformers import Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    active = TOP_K * shape["expert_inter"]
    if not moe:
        return Qwen3Config(**common, intermediate_size=active)
    return Qwen3MoeConfig(
        **common,
        intermediate_size=active,
        moe_intermediate_size=shape["expert_inter"],
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        norm_topk_prob=True,
    )


def build(shape: dict, moe: bool, into: Path, packings: tuple[str, ...] = ()):
    """(transformers model, cortex model, *cortex models packed as ``packings``) on the same random
    weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(hf_config(shape, moe), dtype=torch.float32).eval()
    randomize(hf)
    hf.save_pretrained(into)
    cfg = ModelConfig.from_hf_dir(into)
    ours = model_class(cfg)(cfg)
    files = [str(f) for f in sorted(into.glob("*.safetensors"))]
    load_weights(ours, "safetensors", files)
    packed = [model_class(cfg)(cfg) for _ in packings]
    for model, mode in zip(packed, packings, strict=True):
        load_weights(model, "safetensors", files, quantize=mode)
    return hf, ours, *packed


def prompts(streams: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(streams)
    return torch.randint(3, vocab, (streams, PROMPT), generator=g).tolist()


def cortex_decode(model, streams: int, steps: int) -> tuple[float, list[int]]:
    """(tokens/s over ``steps`` decode steps of ``streams`` sequences together, stream 0's tokens)."""
    ids = prompts(streams, model.cfg.vocab_size)
    run = LocalRunner(model, torch.device("cpu"), num_blocks=streams * ((PROMPT + steps) // 16 + 2))
    last = run.step_many([(s, p, 0) for s, p in enumerate(ids)]).argmax(-1).tolist()
    out = [last[0]]
    t0 = time.perf_counter()
    for i in range(steps):
        last = run.step_many([(s, [tok], PROMPT + i) for s, tok in enumerate(last)]).argmax(-1).tolist()
        out.append(last[0])
    return streams * steps / (time.perf_counter() - t0), out


@torch.inference_mode()
def hf_decode(model, streams: int, steps: int) -> tuple[float, list[int]]:
    ids = torch.tensor(prompts(streams, model.config.vocab_size))
    step = model(input_ids=ids, use_cache=True)
    past, last = step.past_key_values, step.logits[:, -1].argmax(-1)
    out = [int(last[0])]
    t0 = time.perf_counter()
    for _ in range(steps):
        step = model(input_ids=last[:, None], past_key_values=past, use_cache=True)
        past, last = step.past_key_values, step.logits[:, -1].argmax(-1)
        out.append(int(last[0]))
    return streams * steps / (time.perf_counter() - t0), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    shape, steps = (QUICK, 8) if args.quick else (FULL, args.steps)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours, int8, int4 = build(shape, True, Path(tmp) / "moe", packings=("int8", "int4"))
        _, dense = build(shape, False, Path(tmp) / "dense")
    params = sum(p.numel() for p in ours.parameters())
    print(
        f"# bench/moe.py: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    )
    print(f"# Qwen3-MoE {shape}, {EXPERTS} experts top-{TOP_K}: {params / 1e6:.1f} M parameters")
    print(f"# transformers experts implementation: {hf.config._experts_implementation}")
    for streams in (1, 16):
        best = {"cortex": 0.0, "transformers": 0.0, "cortex dense": 0.0, "int8": 0.0, "int4": 0.0}
        for _ in range(args.rounds):
            rate, got = cortex_decode(ours, streams, steps)
            best["cortex"] = max(best["cortex"], rate)
            rate, want = hf_decode(hf, streams, steps)
            best["transformers"] = max(best["transformers"], rate)
            best["cortex dense"] = max(best["cortex dense"], cortex_decode(dense, streams, steps)[0])
            for mode, model in (("int8", int8), ("int4", int4)):
                best[mode] = max(best[mode], cortex_decode(model, streams, steps)[0])
        same = sum(a == b for a, b in zip(got, want, strict=True))
        print(
            f"{streams:>2} streams: cortex {best['cortex']:8.1f} tok/s | transformers {best['transformers']:8.1f} tok/s"
            f" ({best['cortex'] / best['transformers']:.2f}x) | dense same-active {best['cortex dense']:8.1f} tok/s"
            f" (MoE / dense {best['cortex'] / best['cortex dense']:.2f}) | packed: int8 {best['int8']:6.1f}"
            f" ({best['int8'] / best['transformers']:.2f}x), int4 {best['int4']:6.1f} tok/s"
            f" ({best['int4'] / best['transformers']:.2f}x) | greedy agree {same}/{len(got)}"
        )


if __name__ == "__main__":
    main()

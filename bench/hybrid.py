"""The hybrid Qwen3.5 served end to end: cortex vs transformers, batching, and the saved-state prefix cache.

    .venv/bin/python bench/hybrid.py [--quick] [--tokens 128] [--streams 16] [--history 2000] [--threads N]

The model is a random-weight Qwen3.5 with Qwen3.5-0.8B's shape (24 layers, three Gated DeltaNet
layers to one gated full-attention layer, 16 key / 16 value linear heads of 128, conv kernel 4,
8 query / 2 KV heads of 256 with RoPE on a quarter of them, MLP 3584, 248,320-token vocabulary,
tied embeddings), written once by transformers' ``Qwen3_5ForCausalLM`` (no download) with the real
Qwen3.5 tokenizer (tests/qwen_tok.py) into ``--cache`` (default ~/.cache/cortex-bench). The file
is bfloat16 (half the disk); both engines compute in float32, the CPU path's dtype (cortex's
``dtype = "auto"`` on the CPU, and transformers loaded with ``dtype=float32``), on the same values.

Measured in one run, on the same weights and thread count:
1. single-stream decode: `cortex serve` over HTTP (greedy, ``--tokens`` tokens, a short prompt) vs
   transformers ``generate`` (greedy, its cache); for both, rate = (tokens - 1) / (time for tokens -
   time for 1), the prompt excluded as in bench/decode.py (non-streamed requests: a random model's
   tokens need not render as text events);
2. ``--streams`` concurrent requests vs one: aggregate generated tokens/s, prompts included;
3. the second turn of a ``--history``-token conversation: time to first token (a one-token
   completion) with the prefix cache (the first turn's saved recurrent state) and with it off
   (``[engine] state_checkpoints = 0``, a second server);
4. llama.cpp: only if llama-cpp-python is installed (`make bench-deps`), and even then skipped:
   there is no GGUF of this random model to give it.
The engines are measured one after the other (transformers first): on a shared machine, load that
comes and goes lands on one of them, so rerun before quoting the decode ratio.
``--quick`` uses a small model of the same layer pattern and fewer tokens: a smoke test (about a
minute, after the first run writes the model).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench.server  # noqa: E402
from bench.server import running_server  # noqa: E402

# Qwen3.5-0.8B's text model (its config.json), the weights random
FULL = dict(
    hidden_size=1024,
    intermediate_size=3584,
    num_hidden_layers=24,
    layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 6,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=256,
    linear_conv_kernel_dim=4,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    linear_num_key_heads=16,
    linear_num_value_heads=16,
    rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
)
# the same pattern, small enough to build, load and run in seconds
QUICK = dict(
    FULL,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    layer_types=["linear_attention"] * 3 + ["full_attention"],
    num_attention_heads=4,
    head_dim=64,
    linear_key_head_dim=64,
    linear_value_head_dim=64,
    linear_num_key_heads=4,
    linear_num_value_heads=4,
)
VOCAB = 248320  # Qwen3.5's embedding rows (248,044 ranks + added tokens, padded)
SHORT = "Write a long story about a dragon who learns to paint."
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def make_model(cache: Path, name: str, shape: dict) -> Path:
    """The random checkpoint ``cache/name`` (written once; rewritten when ``shape`` changes)."""
    from tests.checkpoints import hybrid_randomize, write_chatml_tokenizer_config
    from tests.qwen_tok import build

    path = cache / name
    stamp = json.dumps(shape, sort_keys=True)
    if (path / "shape.json").exists() and (path / "shape.json").read_text() == stamp:
        return path
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    print(f"writing {path} (once)", flush=True)
    torch.manual_seed(0)
    tok = build(path, "qwen3_5")
    eos = next(t["id"] for t in json.loads(tok.read_text())["added_tokens"] if t["content"] == "<|im_end|>")
    cfg = Qwen3_5TextConfig(
        **shape, vocab_size=VOCAB, tie_word_embeddings=True, max_position_embeddings=262144, eos_token_id=eos
    )
    with torch.device("cpu"):
        model = Qwen3_5ForCausalLM(cfg)
    # randn weights scaled by fan-in, decays near 1: the state carries far, nothing overflows
    hybrid_randomize(model.float())
    model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(path)
    write_chatml_tokenizer_config(path)
    (path / "shape.json").write_text(stamp)
    return path


def hf_decode(path: Path, prompt: str, tokens: int) -> tuple[float, int]:
    """transformers' greedy decode tok/s, prompt excluded (bench/decode.py's way), and the
    parameter count; the model is freed before the servers start."""
    from transformers import AutoTokenizer

    from tests.checkpoints import hf_hybrid_model

    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = torch.tensor([ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids])
    hf = hf_hybrid_model(path)  # float32
    params = sum(p.numel() for p in hf.parameters())
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def run(k: int) -> float:
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=k, min_new_tokens=k, **kw)
        return time.perf_counter() - t

    run(2)  # warm-up
    return (tokens - 1) / (run(tokens) - run(1)), params  # the model goes with this frame


@contextlib.contextmanager
def hybrid_server(path: Path, threads: int, engine: str):
    """bench/server.py's running_server, serving ``path`` as model "default". It reads its catalogue
    from ROOT/conf/models.toml (the embedded one); here ROOT points at a folder whose catalogue
    lists only this model, so the start-up, health wait and shutdown stay that one function's."""
    root = Path(tempfile.mkdtemp())
    (root / "conf").mkdir()
    (root / "conf" / "models.toml").write_text(
        f'[[models]]\nid = "hybrid"\npath = "{path}"\npreload = true\nmax_context = 8192\n'
        '[aliases]\ndefault = "hybrid"\n'
    )
    with mock.patch.object(bench.server, "ROOT", root), running_server(threads, engine) as url:
        chat(url, [{"role": "user", "content": "warm up"}], 2)  # waits for the preload
        yield url


def chat(url: str, messages: list[dict], max_tokens: int) -> tuple[float, dict]:
    """One non-streamed greedy completion: (seconds, response). With max_tokens = 1 the time is the
    time to first token (prefill, one sample, the HTTP round trip)."""
    body = {"model": "default", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=1800)
    elapsed = time.perf_counter() - t0
    r.raise_for_status()
    return elapsed, r.json()


def concurrent(url: str, streams: int, tokens: int) -> dict:
    """``streams`` clients at once, each one greedy completion of ``tokens`` tokens from its own
    prompt (so no prefix is shared): aggregate generated tokens/s over the wall time, as
    bench/serve.py's load_run counts it. Non-streamed: a random model's tokens need not render as
    text (special tokens, reasoning tags), and load_run times text events."""
    prompts = [[{"role": "user", "content": f"Client {c}: {SHORT}"}] for c in range(streams)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        done = list(pool.map(lambda m: chat(url, m, tokens)[1], prompts))
    return {"tok_s": sum(r["usage"]["completion_tokens"] for r in done) / (time.perf_counter() - t0)}


def conversation(history: int) -> list[dict]:
    """A first turn of about ``history`` tokens (a ChatML system + user message)."""
    lines, n = [], 0
    while n < history:
        lines.append(f"Note {len(lines) + 1}: the lighthouse keeper logged the storm at hour {len(lines) % 24}.")
        n += 17  # about 17 tokens a line with Qwen's vocabulary
    return [
        {"role": "system", "content": "You are a careful assistant. Answer from the notes."},
        {"role": "user", "content": "\n".join(lines) + "\nSummarise the notes."},
    ]


def machine() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    have = " ".join(f for f in FLAGS if f in flags)
    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} cores, flags: {have or '?'}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="a small model and few tokens: a smoke test")
    p.add_argument("--tokens", type=int, help="decoded per stream (default 128, quick 16)")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--history", type=int, help="tokens of the conversation's first turn (default 2000, quick 300)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "cortex-bench")
    args = p.parse_args()
    tokens = args.tokens or (16 if args.quick else 128)
    history = args.history or (300 if args.quick else 2000)
    torch.set_num_threads(args.threads)
    name = "qwen3_5-quick-random" if args.quick else "qwen3_5-0.8b-random"
    path = make_model(args.cache, name, QUICK if args.quick else FULL)

    hf_rate, params = hf_decode(path, SHORT, tokens)
    gc.collect()  # transformers' copy of the weights, before the servers load theirs
    first = conversation(history)
    # a busy 2-core machine makes long steps: nothing may time out in the queue or the watchdog
    engine = f"max_seqs = {max(args.streams, 2)}\nqueue_timeout_s = 3600\nstep_timeout_s = 900\n"
    with hybrid_server(path, args.threads, engine) as url:
        short = [{"role": "user", "content": SHORT}]
        # the same subtraction as for transformers: what the last tokens - 1 cost, prompt excluded
        t1, _ = chat(url, short, 1)
        tn, _ = chat(url, short, tokens)
        cortex_rate = (tokens - 1) / (tn - t1)
        one = {"tok_s": tokens / tn}  # one stream's aggregate rate, its prompt included
        print(f"decode: cortex {cortex_rate:.2f} tok/s, transformers {hf_rate:.2f} tok/s", flush=True)
        many = concurrent(url, args.streams, tokens)
        print(f"{args.streams} streams: {many['tok_s']:.2f} tok/s, 1 stream {one['tok_s']:.2f} tok/s", flush=True)
        cold, turn1 = chat(url, first, tokens // 2)  # the first turn: whole prompt, its state saved
        reply = {"role": "assistant", "content": turn1["choices"][0]["message"]["content"] or "(nothing)"}
        # three second turns, each a different question after the same history: each resumes from
        # the first turn's saved state; the best of three, as a short request is at the mercy of
        # any other process on the machine
        # (questions that differ from their first token on, so that none resumes from another's state)
        ask = "o'clock: tell me everything that happened at that hour, who was there and what the keeper wrote."
        seconds = [first + [reply, {"role": "user", "content": f"{h} {ask}"}] for h in (7, 8, 9)]
        warm, hit = min((chat(url, m, 1) for m in seconds), key=lambda r: r[0])
    with hybrid_server(path, args.threads, engine + "state_checkpoints = 0\n") as url:
        off, miss = chat(url, seconds[0], 1)  # the whole prompt again: seconds long, one is enough
    llama = importlib.util.find_spec("llama_cpp") is not None

    prompt_tokens = hit["usage"]["prompt_tokens"]
    cached = (hit["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    missed = (miss["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    print(
        f"\n# Qwen3.5 hybrid ({params / 1e6:.0f}M parameters, random weights, {'quick' if args.quick else '0.8B shape'}), "
        f"float32 on the CPU, {args.threads} threads, torch {torch.__version__}, "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    )
    print(f"# {machine()}")
    rows = [
        ("single-stream decode, tok/s", f"cortex serve {cortex_rate:.1f}", f"transformers {hf_rate:.1f}",
         cortex_rate / hf_rate, 5),
        (f"{args.streams} streams vs 1, aggregate tok/s", f"{many['tok_s']:.1f}", f"{one['tok_s']:.1f}",
         many["tok_s"] / one["tok_s"], 3),
        (f"turn 2 TTFT, {prompt_tokens}-token prompt", f"cache {warm * 1e3:.0f} ms ({cached} cached, best of 3)",
         f"off {off * 1e3:.0f} ms ({missed} cached)", off / warm, 5),
    ]  # fmt: skip
    print(f"| {'measure':<40} | {'cortex':<36} | {'reference':<28} | ratio | aim |")
    print(f"|{'-' * 42}|{'-' * 38}|{'-' * 30}|-------|-----|")
    for what, ours, theirs, ratio, aim in rows:
        print(f"| {what:<40} | {ours:<36} | {theirs:<28} | {ratio:4.1f}x | {aim}x |")
    print(f"first turn ({turn1['usage']['prompt_tokens']} tokens, nothing cached): {cold:.2f} s for its prompt and "
          f"{tokens // 2} tokens")  # fmt: skip
    if llama:
        print("llama.cpp: llama_cpp is importable, but there is no GGUF of this random model: skipped")
    else:
        print("llama.cpp: skipped (llama_cpp is not importable; `make bench-deps` installs llama-cpp-python)")


if __name__ == "__main__":
    main()

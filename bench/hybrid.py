"""The hybrid Qwen3.5 served end to end: cortex vs transformers and llama.cpp, float32 and int8,
batching, and the saved-state prefix cache.

    .venv/bin/python bench/hybrid.py [--quick] [--tokens 128] [--streams 16] [--history 2000] [--rounds 2]
                                     [--threads N] [--engines hf,f32,int8,llama-f32,llama-q8_0]

The model is a random-weight Qwen3.5 with Qwen3.5-0.8B's shape (24 layers, three Gated DeltaNet
layers to one gated full-attention layer, 16 key / 16 value linear heads of 128, conv kernel 4,
8 query / 2 KV heads of 256 with RoPE on a quarter of them, MLP 3584, 248,320-token vocabulary,
tied embeddings), written once by transformers' ``Qwen3_5ForCausalLM`` (no download) with the real
Qwen3.5 tokenizer (tests/qwen_tok.py) into ``--cache`` (default ~/.cache/cortex-bench). The file
is bfloat16 (half the disk); every engine computes on those values.

The engines (``--engines``; each a server or model of its own, started once per round):
- ``hf``: transformers ``generate`` in float32 (greedy, its cache), in-process;
- ``f32``, ``int8``, ``bf16``: `cortex serve` with ``dtype = "auto"`` (float32 on the CPU),
  ``quantize = "int8"`` (every linear, the DeltaNet's fused in_proj and out_proj and the tied
  248k-row head included, int8 per row; activations quantized on the fly) or ``dtype = "bfloat16"``;
- ``llama-f32``, ``llama-q8_0``: llama.cpp's ``llama-server -t T -tb T -np STREAMS`` (built by
  ``bench/llama_server.py --build``) on the same checkpoint written as GGUF by tests/gguf_writer.py
  (the converter's layout; its token list padded to the 248,320 embedding rows), F32 or with every
  matrix Q8_0 (the embedding too, conv and norms F32, as the converter's q8_0). Written once next to
  the model (``<model>-f32.gguf``, ``<model>-q8_0.gguf``). Skipped if there is no llama-server.

Measured for each engine, in ``--rounds`` rounds that alternate the engines (the order reversed
every other round, so load that comes and goes on a shared machine lands on all of them), the best
round per engine reported (and the range):
1. single-stream decode: greedy, ``--tokens`` tokens from a short chat prompt; rate = (tokens - 1) /
   (time for tokens - time for 1), the prompt excluded as in bench/decode.py. The servers get the
   same prompt token ids: cortex renders the chat template itself, llama.cpp's ``/completion`` is
   sent the ids transformers' template gives (the token counts are printed: they must agree);
   non-streamed requests (a random model's tokens need not render as text events);
2. ``--streams`` concurrent requests (each its own prompt, so no prefix is shared) and one: aggregate
   generated tokens/s over the wall time, prompts included; servers only;
3. (cortex float32, after the rounds) the second turn of a ``--history``-token conversation: time
   to first token (a one-token completion) with the prefix cache (the first turn's saved recurrent
   state) and with it off (``[engine] state_checkpoints = 0``, a second server right after).
Ratios compare like with like where it says so: cortex float32 with transformers and llama.cpp
float32; cortex int8 with llama.cpp Q8_0; cortex int8 with transformers float32 is int8 against
float32 (transformers has no int8 CPU path of its own), and is labelled so.
``--quick`` uses a small model of the same layer pattern and fewer tokens: a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench.server  # noqa: E402
from bench.llama_server import CACHE as LLAMA_CACHE  # noqa: E402
from bench.llama_server import running_llama_server  # noqa: E402
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


# (seconds, generated tokens, prompt tokens) of one greedy completion of ``tokens`` tokens
Complete = Callable[[list[dict], int], tuple[float, int, int]]
ENGINES = ("hf", "f32", "int8", "llama-f32", "llama-q8_0")  # the default set; "bf16" on request
LABELS = {
    "hf": "transformers float32",
    "f32": "cortex float32",
    "int8": "cortex int8",
    "bf16": "cortex bfloat16",
    "llama-f32": "llama.cpp F32",
    "llama-q8_0": "llama.cpp Q8_0",
}
# the models.toml lines of each cortex engine
CORTEX = {"f32": "", "int8": 'quantize = "int8"\n', "bf16": 'dtype = "bfloat16"\n'}
# tests/gguf_writer.py's arguments for each llama.cpp engine: Q8_0 for every matrix it may quantize
GGUF = {"llama-f32": {}, "llama-q8_0": {"quantize": ("weight",), "qtype": "Q8_0"}}


def write_gguf_once(path: Path, engine: str) -> Path:
    """``path`` (a checkpoint folder) as GGUF beside it, written when missing or older than the
    checkpoint (make_model rewrites shape.json with it; delete the file after a change to the
    writer); through a temporary name, so an interrupted write is never taken for a file."""
    from tests.gguf_writer import write_gguf

    out = path.with_name(f"{path.name}-{engine.removeprefix('llama-')}.gguf")
    if out.exists() and out.stat().st_mtime >= (path / "shape.json").stat().st_mtime:
        return out
    print(f"writing {out} (once)", flush=True)
    part = out.with_suffix(".part")
    write_gguf(path, part, **GGUF[engine])
    part.rename(out)
    return out


def prompt_ids(tok, messages: list[dict]) -> list[int]:
    """The chat template's prompt ids (transformers), as cortex renders and encodes them."""
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@contextlib.contextmanager
def hf_engine(path: Path) -> Iterator[Complete]:
    """transformers in float32 (tests/checkpoints.py's hf_hybrid_model), greedy ``generate``."""
    from transformers import AutoTokenizer

    from tests.checkpoints import hf_hybrid_model

    tok, hf = AutoTokenizer.from_pretrained(path), hf_hybrid_model(path)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def complete(messages: list[dict], tokens: int) -> tuple[float, int, int]:
        ids = torch.tensor([prompt_ids(tok, messages)])
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
        return time.perf_counter() - t, tokens, ids.shape[1]

    complete([{"role": "user", "content": "warm up"}], 2)
    yield complete  # the model goes with this frame, before the next engine starts


@contextlib.contextmanager
def hybrid_server(path: Path, threads: int, engine: str, model: str = "") -> Iterator[str]:
    """bench/server.py's running_server, serving ``path`` as model "default" with the models.toml
    lines ``model``. It reads its catalogue from ROOT/conf/models.toml (the embedded one); here ROOT
    points at a folder whose catalogue lists only this model, so the start-up, health wait and
    shutdown stay that one function's."""
    root = Path(tempfile.mkdtemp())
    (root / "conf").mkdir()
    (root / "conf" / "models.toml").write_text(
        f'[[models]]\nid = "hybrid"\npath = "{path}"\npreload = true\nmax_context = 8192\n{model}'
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


def cortex_complete(url: str) -> Complete:
    def complete(messages: list[dict], tokens: int) -> tuple[float, int, int]:
        seconds, r = chat(url, messages, tokens)
        return seconds, r["usage"]["completion_tokens"], r["usage"]["prompt_tokens"]

    return complete


@contextlib.contextmanager
def llama_engine(binary: Path, gguf: Path, tok, threads: int, streams: int, ctx: int) -> Iterator[Complete]:
    """llama-server with ``streams`` slots of ``ctx`` tokens; each completion is sent the prompt's
    token ids (its ``/completion`` endpoint): our GGUF carries no chat template and a plain
    pre-tokenizer, so ids are the way to give both servers the same prompt."""
    with running_llama_server(binary, gguf, threads, streams, ctx) as url:

        def complete(messages: list[dict], tokens: int) -> tuple[float, int, int]:
            body = {"prompt": prompt_ids(tok, messages), "n_predict": tokens, "ignore_eos": True}
            body |= {"temperature": 0, "top_k": 1, "samplers": ["top_k"]}  # greedy
            t0 = time.perf_counter()
            r = httpx.post(url + "/completion", json=body, timeout=1800)
            elapsed = time.perf_counter() - t0
            r.raise_for_status()
            got = r.json()
            return elapsed, got["tokens_predicted"], got["tokens_evaluated"]  # evaluated: the whole prompt

        complete([{"role": "user", "content": "warm up"}], 2)
        yield complete


def decode_rate(complete: Complete, tokens: int) -> tuple[float, float, int]:
    """(decode tok/s with the prompt excluded: the last tokens - 1 over what they added to the time
    of a one-token completion, bench/decode.py's way; one stream's aggregate tok/s, its prompt
    included; prompt tokens)."""
    short = [{"role": "user", "content": SHORT}]
    t1 = min(complete(short, 1)[0] for _ in range(2))  # the lower: a load spike here would inflate the rate
    tn, n, prompt = complete(short, tokens)
    # a span swallowed by the noise of t1 (a busy machine, few fast tokens) measures nothing
    return (n - 1) / (tn - t1) if tn > t1 else math.nan, n / tn, prompt


def concurrent(complete: Complete, streams: int, tokens: int) -> float:
    """``streams`` clients at once, each one greedy completion of ``tokens`` tokens from its own
    prompt (so no prefix is shared): aggregate generated tokens/s over the wall time, as
    bench/serve.py's load_run counts it."""
    prompts = [[{"role": "user", "content": f"Client {c}: {SHORT}"}] for c in range(streams)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        done = list(pool.map(lambda m: complete(m, tokens)[1], prompts))
    return sum(done) / (time.perf_counter() - t0)


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


@contextlib.contextmanager
def open_engine(name: str, path: Path, tok, args, engine: str) -> Iterator[Complete]:
    """The engine ``name`` started, as its completion function."""
    if name == "hf":
        with hf_engine(path) as complete:
            yield complete
    elif name in CORTEX:
        with hybrid_server(path, args.threads, engine, CORTEX[name]) as url:
            yield cortex_complete(url)
    else:
        ctx = args.tokens + 256  # a slot: the prompt (about 30 tokens) and the completion
        with llama_engine(args.llama_server, write_gguf_once(path, name), tok, args.threads, args.streams, ctx) as c:
            yield c


def prefix_cache(url: str, history: int, tokens: int) -> tuple[dict, list[dict]]:
    """The first turn of a ``history``-token conversation, then three second turns, each a different
    question after it: each resumes from the first turn's saved state; the best of three, as a short
    request is at the mercy of any other process on the machine. Returns the figures and the second
    turns (for the server without the cache)."""
    first = conversation(history)
    cold, turn1 = chat(url, first, tokens // 2)  # the first turn: whole prompt, its state saved
    reply = {"role": "assistant", "content": turn1["choices"][0]["message"]["content"] or "(nothing)"}
    # (questions that differ from their first token on, so that none resumes from another's state)
    ask = "o'clock: tell me everything that happened at that hour, who was there and what the keeper wrote."
    seconds = [first + [reply, {"role": "user", "content": f"{h} {ask}"}] for h in (7, 8, 9)]
    warm, hit = min((chat(url, m, 1) for m in seconds), key=lambda r: r[0])
    cached = (hit["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    got = {"cold": cold, "first_prompt": turn1["usage"]["prompt_tokens"], "warm": warm, "cached": cached}
    return got | {"prompt": hit["usage"]["prompt_tokens"]}, seconds


def measure(name: str, path: Path, tok, args, engine: str) -> dict:
    """One round of engine ``name``: decode, one stream and ``--streams`` streams (servers)."""
    with open_engine(name, path, tok, args, engine) as complete:
        decode, one, prompt = decode_rate(complete, args.tokens)
        got = {"decode": decode, "one": one, "prompt": prompt}
        if name != "hf":  # generate serves one request: nothing to batch
            got["many"] = concurrent(complete, args.streams, args.tokens)
    return got


def rounds(engines: list[str], path: Path, tok, args, engine: str) -> dict[str, list[dict]]:
    """Each engine once a round, the order reversed every other round: what a burst of load from
    other processes costs falls on more than one of them."""
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for r in range(args.rounds):
        for e in engines if r % 2 == 0 else engines[::-1]:
            runs[e].append(measure(e, path, tok, args, engine))
            got = ", ".join(f"{k} {v:.2f}" for k, v in runs[e][-1].items())
            print(f"round {r + 1} {LABELS[e]}: {got} (load average {load()})", flush=True)
    return runs


def turn_two(path: Path, args, engine: str, history: int) -> tuple[dict, tuple[float, int]]:
    """The second turn's time to first token with cortex float32's prefix cache, then on a server
    without it (``state_checkpoints = 0``): the whole prompt again, seconds long, one is enough."""
    with hybrid_server(path, args.threads, engine) as url:
        cache, seconds = prefix_cache(url, history, args.tokens)
    with hybrid_server(path, args.threads, engine + "state_checkpoints = 0\n") as url:
        t, miss = chat(url, seconds[0], 1)
    return cache, (t, (miss["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0))


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def best(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if key in r and not math.isnan(r[key])]
    return max(values) if values else None


def ratio(ours: float | None, theirs: float | None) -> str:
    return f"{ours / theirs:.2f}x" if ours and theirs else "-"


def spread(runs: list[dict], key: str) -> str:
    values = [r[key] for r in runs if key in r and not math.isnan(r[key])]
    if not values:
        return "-"
    return f"{max(values):.2f} ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else f"{values[0]:.2f}"


def report(args, params: int, runs: dict[str, list[dict]], cache: dict, off: tuple[float, int] | None) -> None:
    n = args.streams
    print(
        f"\n# Qwen3.5 hybrid ({params / 1e6:.0f}M parameters, random weights, {'quick' if args.quick else '0.8B shape'}), "
        f"on the CPU, {args.threads} threads, {args.tokens} tokens, best of {args.rounds} alternating rounds, "
        f"torch {torch.__version__}, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    )
    print(f"# {machine()}; load average {load()} at the end")
    if any(e.startswith("llama") for e in runs):
        print(f"# {args.llama_server} -t {args.threads} -tb {args.threads} -np {n}")
    print(f"| engine | decode, 1 stream (tok/s) | 1 stream, prompt included | {n} streams | {n} vs 1 | prompt tokens |")
    print("|---|---|---|---|---|---|")
    for name, r in runs.items():
        scaling = ratio(best(r, "many"), best(r, "one"))
        print(f"| {LABELS[name]} | {spread(r, 'decode')} | {spread(r, 'one')} | {spread(r, 'many')} | {scaling} | "
              f"{r[0]['prompt']} |")  # fmt: skip
    rows = [
        ("decode, cortex float32 / transformers float32", "f32", "hf", "decode", "5x"),
        ("decode, cortex int8 / transformers float32 (int8 vs f32)", "int8", "hf", "decode", "5x"),
        ("decode, cortex bfloat16 / transformers float32 (bf16 vs f32)", "bf16", "hf", "decode", "5x"),
        ("decode, cortex float32 / llama.cpp F32", "f32", "llama-f32", "decode", ""),
        ("decode, cortex int8 / llama.cpp Q8_0", "int8", "llama-q8_0", "decode", ""),
        (f"{n} streams, cortex float32 / llama.cpp F32", "f32", "llama-f32", "many", ""),
        (f"{n} streams, cortex int8 / llama.cpp Q8_0", "int8", "llama-q8_0", "many", ""),
    ]
    print("\n| comparison (best / best) | ratio | aim |\n|---|---|---|")
    for what, ours, theirs, key, aim in rows:
        if ours in runs and theirs in runs:
            print(f"| {what} | {ratio(best(runs[ours], key), best(runs[theirs], key))} | {aim} |")
    for name in ("f32", "int8", "bf16"):
        if name in runs:
            print(
                f"| {n} streams vs 1, {LABELS[name]} | {ratio(best(runs[name], 'many'), best(runs[name], 'one'))} | 3x |"
            )
    if cache and off:
        print(f"| turn 2 TTFT, {cache['prompt']}-token prompt: prefix cache {cache['warm'] * 1e3:.0f} ms "
              f"({cache['cached']} cached, best of 3) vs off {off[0] * 1e3:.0f} ms ({off[1]} cached) | "
              f"{off[0] / cache['warm']:.1f}x | 5x |")  # fmt: skip
        print(f"first turn ({cache['first_prompt']} tokens, nothing cached): {cache['cold']:.2f} s for its prompt and "
              f"{args.tokens // 2} tokens")  # fmt: skip


def main() -> None:
    found = sorted(LLAMA_CACHE.glob("build-*/bin/llama-server"))
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="a small model and few tokens: a smoke test")
    p.add_argument("--tokens", type=int, help="decoded per stream (default 128, quick 16)")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--history", type=int, help="tokens of the conversation's first turn (default 2000, quick 300)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; each engine's best is reported")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(LABELS)}")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "cortex-bench")
    p.add_argument("--llama-server", type=Path, default=found[-1] if found else None)
    args = p.parse_args()
    args.tokens = args.tokens or (16 if args.quick else 128)
    history = args.history or (300 if args.quick else 2000)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if unknown := set(engines) - set(LABELS):
        p.error(f"unknown engines {sorted(unknown)}: expected some of {', '.join(LABELS)}")
    if args.llama_server is None or not args.llama_server.exists():
        print("llama.cpp: skipped (no llama-server: `.venv/bin/python bench/llama_server.py --build`)")
        engines = [e for e in engines if not e.startswith("llama")]
    torch.set_num_threads(args.threads)
    name = "qwen3_5-quick-random" if args.quick else "qwen3_5-0.8b-random"
    path = make_model(args.cache, name, QUICK if args.quick else FULL)
    for e in engines:  # before the rounds: writing a GGUF is no engine's time
        if e in GGUF:
            write_gguf_once(path, e)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    # a busy 2-core machine makes long steps: nothing may time out in the queue or the watchdog
    engine = f"max_seqs = {max(args.streams, 2)}\nqueue_timeout_s = 3600\nstep_timeout_s = 900\n"
    print(f"load average {load()} at the start", flush=True)
    runs = rounds(engines, path, tok, args, engine)
    cache, off = turn_two(path, args, engine, history) if "f32" in engines else ({}, None)
    report(args, parameters(path), runs, cache, off)


def parameters(path: Path) -> int:
    """The checkpoint's parameter count, from the tensors' shapes (the tied head is stored once)."""
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (not a dict)


if __name__ == "__main__":
    main()

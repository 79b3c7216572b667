"""Batched work, cortex vs llama.cpp: how N sequences decoding together scale over one, and prompt processing.

    .venv/bin/python bench/batched.py [--batch 1,4,16] [--tokens 64] [--prompt 1000] [--threads N] [--rounds 3]

The engine's 16-stream target (aggregate >= 6x one stream) is a property of the hardware as much as
of the engine: one sequence's step reads every weight once (bound by memory bandwidth), N sequences'
step does N times the arithmetic on the same bytes (bound by compute once N is large enough). This
script measures that curve for both engines on the same machine, in the same run, without HTTP:
- cortex: the worker's model, in-process (LocalRunner), the server's KV dtype (float16 on the CPU),
  N sequences per step;
- llama.cpp (llama-cpp-python, `make bench-deps`): its low-level batch API, N sequences per
  `llama_decode`, the same GGUF file and thread count.
Each sequence has its own prompt (prefilled first, untimed); then every step decodes one greedy
token for every sequence. Reported: aggregate tokens/s, the ratio to N = 1 for each engine, and
cortex / llama.cpp at each N. Then one ``--prompt``-token prompt is prefilled from scratch, in
each engine's default chunk (cortex: `[engine] prefill_chunk`; llama.cpp: its n_batch of 512):
prompt tokens/s, the time to a first token without a prefix cache. Rounds alternate the engines;
the best of each is quoted.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cortex.config import load  # noqa: E402
from cortex.models import source  # noqa: E402
from workers.arch import model_class  # noqa: E402
from workers.kv_cache import BLOCK_SIZE, LocalRunner  # noqa: E402
from workers.weights import load_weights  # noqa: E402

SUBJECTS = ["a dragon", "a lighthouse keeper", "a robot chef", "two rival bakers", "a lost map", "a quiet moon"]


def prompts(files, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        text = f"Write a long story about {SUBJECTS[i % len(SUBJECTS)]} (part {i + 1})."
        out.append(files.tokenizer.encode(files.template.render([{"role": "user", "content": text}])))
    return out


def cortex_decode(model, batch: list[list[int]], tokens: int) -> float:
    """Aggregate decode tokens/s of len(batch) sequences stepping together."""
    blocks = sum(-(-(len(p) + tokens) // BLOCK_SIZE) for p in batch) + 1
    run = LocalRunner(model, torch.device("cpu"), num_blocks=blocks, kv_dtype=torch.float16)
    last = [int(run.step(i, p, 0).argmax()) for i, p in enumerate(batch)]
    pos = [len(p) for p in batch]
    t0 = time.perf_counter()
    for _ in range(tokens - 1):
        logits = run.step_many([(i, [tok], pos[i]) for i, tok in enumerate(last)])
        last = logits.argmax(dim=-1).tolist()
        pos = [p + 1 for p in pos]
    return len(batch) * (tokens - 1) / (time.perf_counter() - t0)


def cortex_prefill(model, ids: list[int], chunk: int) -> float:
    """Prompt tokens/s of one prompt prefilled from an empty cache, ``chunk`` tokens per step."""
    run = LocalRunner(model, torch.device("cpu"), num_blocks=len(ids) // BLOCK_SIZE + 2, kv_dtype=torch.float16)
    t0 = time.perf_counter()
    for start in range(0, len(ids), chunk):
        run.step(0, ids[start : start + chunk], start)
    return len(ids) / (time.perf_counter() - t0)


class LlamaCppBatched:
    """llama.cpp's low-level API. Decoding: one context with a KV cache per sequence (llama.cpp's
    fastest layout for parallel sequences), one llama_decode per step. Prefill: a context of its
    own, one sequence, the default batch of 512 tokens."""

    CHUNK = 512  # llama.cpp's default n_batch / n_ubatch

    def __init__(self, path: str, threads: int, max_seqs: int, max_ctx: int, max_prompt: int):
        import llama_cpp as lc
        import numpy as np

        self.lc, self.np, self.threads = lc, np, threads
        self._quiet = lc.llama_log_callback(lambda level, text, data: None)  # kept: C holds the pointer
        lc.llama_log_set(self._quiet, ctypes.c_void_p())
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(path.encode(), lc.llama_model_default_params())
        self.vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.ctx = self._context(max_seqs * max_ctx, max_seqs)
        self.prefill_ctx = self._context(max_prompt + 16, 1)
        self.batch = lc.llama_batch_init(max(max_ctx, max_seqs, self.CHUNK), 0, max_seqs)

    def _context(self, n_ctx: int, seqs: int):
        params = self.lc.llama_context_default_params()
        params.n_ctx, params.n_seq_max = n_ctx, seqs
        params.n_batch = params.n_ubatch = max(n_ctx // seqs, seqs, self.CHUNK)
        params.n_threads = params.n_threads_batch = self.threads
        return self.lc.llama_init_from_model(self.model, params)

    def _decode(self, ctx, rows: list[tuple[int, int, int, bool]]) -> None:
        """rows: (token, position, sequence, wants logits)."""
        b = self.batch
        b.n_tokens = len(rows)
        for i, (tok, pos, seq, logits) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        if self.lc.llama_decode(ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        row = self.lc.llama_get_logits_ith(self.ctx, i)
        return int(self.np.ctypeslib.as_array(ctypes.cast(row, ctypes.POINTER(ctypes.c_float)), (self.vocab,)).argmax())

    def decode(self, batch: list[list[int]], tokens: int) -> float:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        last = []
        for seq, p in enumerate(batch):
            self._decode(self.ctx, [(tok, j, seq, j == len(p) - 1) for j, tok in enumerate(p)])
            last.append(self._argmax(len(p) - 1))
        pos = [len(p) for p in batch]
        t0 = time.perf_counter()
        for _ in range(tokens - 1):
            self._decode(self.ctx, [(tok, pos[s], s, True) for s, tok in enumerate(last)])
            last = [self._argmax(s) for s in range(len(batch))]
            pos = [p + 1 for p in pos]
        return len(batch) * (tokens - 1) / (time.perf_counter() - t0)

    def prefill(self, ids: list[int]) -> float:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.prefill_ctx), True)
        t0 = time.perf_counter()
        for start in range(0, len(ids), self.CHUNK):
            part = ids[start : start + self.CHUNK]
            self._decode(
                self.prefill_ctx, [(tok, start + j, 0, start + j == len(ids) - 1) for j, tok in enumerate(part)]
            )
        return len(ids) / (time.perf_counter() - t0)

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_free(self.prefill_ctx)
        self.lc.llama_model_free(self.model)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", default="1,4,16", help="numbers of sequences decoding together")
    p.add_argument("--tokens", type=int, default=64, help="tokens decoded per sequence")
    p.add_argument("--prompt", type=int, default=1000, help="tokens of the prompt prefilled from scratch")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=3, help="best of this many alternating runs")
    args = p.parse_args()
    sizes = [int(n) for n in args.batch.split(",")]
    torch.set_num_threads(args.threads)

    cfg = load()
    entry, chunk = cfg.catalogue.models[0], cfg.engine.prefill_chunk
    files = source.read(entry)
    model = model_class(files.config)(files.config, dtype=torch.float32)
    load_weights(model, files.format, [str(f) for f in files.files], quantize="auto", device="cpu")
    texts = prompts(files, max(sizes))
    long_prompt = files.tokenizer.encode(" ".join(f"Chapter {i}: the lighthouse and the storm." for i in range(1000)))
    long_prompt = long_prompt[: args.prompt]
    llama = None
    if files.format == "gguf":
        with contextlib.suppress(ImportError):  # llama-cpp-python: `make bench-deps`
            longest = max(map(len, texts)) + args.tokens
            llama = LlamaCppBatched(str(files.files[0]), args.threads, max(sizes), longest, len(long_prompt))

    rates: dict[tuple[str, int | str], list[float]] = {}  # (engine, sequences or "prefill")
    cortex_decode(model, texts[:2], 4)  # warm-up
    if llama:
        llama.decode(texts[:2], 4)
    for _ in range(args.rounds):
        for n in sizes:
            rates.setdefault(("cortex", n), []).append(cortex_decode(model, texts[:n], args.tokens))
            if llama:
                rates.setdefault(("llama.cpp", n), []).append(llama.decode(texts[:n], args.tokens))
        rates.setdefault(("cortex", "prefill"), []).append(cortex_prefill(model, long_prompt, chunk))
        if llama:
            rates.setdefault(("llama.cpp", "prefill"), []).append(llama.prefill(long_prompt))
    if llama:
        llama.close()

    print(
        f"# {entry.id} ({files.format}) on {platform.processor() or platform.machine()}, {args.threads} threads, "
        f"{args.tokens} tokens per sequence, best of {args.rounds}, torch {torch.__version__}"
    )
    engines = ["cortex"] + (["llama.cpp"] if llama else [])
    print(f"{'sequences':>10} " + " ".join(f"{e + ' tok/s':>16} {'vs 1':>6}" for e in engines) + "   cortex/llama.cpp")
    for n in sizes:
        cells, best = [], {}
        for e in engines:
            best[e] = max(rates[(e, n)])
            cells.append(f"{best[e]:16.1f} {best[e] / max(rates[(e, sizes[0])]):5.2f}x")
        ratio = f"   {best['cortex'] / best['llama.cpp']:.2f}x" if llama else ""
        print(f"{n:>10} " + " ".join(cells) + ratio)
    ours = max(rates[("cortex", "prefill")])
    line = f"prefill of {len(long_prompt)} tokens: cortex {ours:.1f} tok/s ({len(long_prompt) / ours:.2f} s, chunks of {chunk})"
    if llama:
        theirs = max(rates[("llama.cpp", "prefill")])
        line += f", llama.cpp {theirs:.1f} tok/s (chunks of {llama.CHUNK}): {ours / theirs:.2f}x"
    print(line)
    if not llama:
        print("llama.cpp skipped (make bench-deps installs llama-cpp-python)")


if __name__ == "__main__":
    main()

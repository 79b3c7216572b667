"""Single-stream decode speed of the default model: cortex vs HF transformers, same weights, same threads.

    .venv/bin/python bench/decode.py [--tokens 128] [--threads N] [--device cpu|cuda:0] [--quantize auto]

Measures in one run, in alternating rounds (best and range), and prints their ratios:
- cortex model: the worker's forward + sampling in-process (no RPC, no HTTP), with ``--quantize``
  (default auto: a GGUF file's 4-bit blocks packed on the CPU), and with quantize = none (dense fp32);
- cortex serve: end to end, streaming over HTTP through the leader and a worker (CPU runs only);
- HF transformers: LlamaForCausalLM.generate (greedy, KV cache) on the weights cortex loads with
  ``quantize = "none"`` (the file's values dequantized to float32; with packed weights cortex
  computes on the same 4-bit blocks with int16-quantized activations, or bfloat16 ones on the
  PyTorch fallback);
- llama.cpp (llama-cpp-python, `make bench-deps`) on the same GGUF file with the same thread count,
  in its own quantized format (Q4_1): the peer users would otherwise run.
Decode rate excludes the prompt: (tokens - 1) / (time of last token - time of first token).
"""

from __future__ import annotations

import argparse
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
from workers.kv_cache import LocalRunner  # noqa: E402
from workers.sampling import greedy  # noqa: E402
from workers.weights import load_weights  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to paint."}]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_cortex_model(model, files, device, n: int) -> tuple[float, list[int]]:
    prompt = files.tokenizer.encode(files.template.render(PROMPT))
    run = LocalRunner(model, device, num_blocks=(len(prompt) + n) // 16 + 2)
    logits = run.step(1, prompt, 0)
    out = [greedy(logits)]  # the worker's greedy pick (workers/sampling.py)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n - 1):
        logits = run.step(1, out[-1:], len(prompt) + len(out) - 1)
        out.append(greedy(logits))
    sync(device)
    return (n - 1) / (time.perf_counter() - t0), out


def hf_runner(model, files, device, dtype):
    """A function n -> (decode tok/s, greedy ids) running HF generate on ``model``'s weights."""
    from bench.hf import hf_twin

    hf = hf_twin(files.config, model.hf_state_dict(), device, dtype)
    ids = torch.tensor([files.tokenizer.encode(files.template.render(PROMPT))], device=device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def run(k: int):
        sync(device)
        t = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=k, min_new_tokens=k, **kw)
        sync(device)
        return time.perf_counter() - t, out

    def bench(n: int) -> tuple[float, list[int]]:
        run(2)  # warm-up
        t1, _ = run(1)
        tn, out = run(n)
        return (n - 1) / (tn - t1), out[0, ids.shape[1] :].tolist()

    return bench


def bench_llama_cpp(path: str, prompt: list[int], n: int, threads: int) -> float | None:
    """Greedy decode through llama.cpp's own loop, prompt excluded; None if not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=path, n_ctx=len(prompt) + n + 16, n_threads=threads, n_threads_batch=threads, verbose=False)

    def run(k: int) -> float:
        llm.reset()
        t0 = time.perf_counter()
        for got, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True), start=1):
            if got == k:
                break
        return time.perf_counter() - t0

    run(4)  # warm-up
    return (n - 1) / (run(n) - run(1))


def bench_server(n: int, threads: int) -> float:
    from bench.serve import stream_once
    from bench.server import running_server

    content = PROMPT[0]["content"]
    with running_server(threads) as url:
        stream_once(url, content, 8)  # warm-up
        best = 0.0
        for _ in range(2):
            res = stream_once(url, content, n)
            best = max(best, (res["tokens"] - 1) / sum(res["itl"]))
        return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--quantize", default="auto", help="auto | none | int8 | int4 (the models.toml key)")
    p.add_argument("--rounds", type=int, default=3, help="best of this many alternating runs")
    p.add_argument("--no-server", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))

    entry = load().catalogue.models[0]
    files = source.read(entry)

    def load_model(quantize: str):
        with torch.device(device):
            model = model_class(files.config)(files.config, dtype=dtype)
        load_weights(model, files.format, [str(f) for f in files.files], quantize=quantize, device=device.type)
        return model

    model, dense = load_model(args.quantize), load_model("none")

    hf_bench = hf_runner(dense, files, device, dtype)
    bench_cortex_model(model, files, device, 8)  # warm-up
    bench_cortex_model(dense, files, device, 8)
    # rounds alternate the three, so a burst of load from other processes hits all of them
    rates: dict[str, list[float]] = {"ours": [], "dense": [], "hf": []}
    for _ in range(args.rounds):
        r, our_ids = bench_cortex_model(model, files, device, args.tokens)
        rates["ours"].append(r)
        if args.quantize != "none":
            r, dense_ids = bench_cortex_model(dense, files, device, args.tokens)
            rates["dense"].append(r)
        r, hf_ids = hf_bench(args.tokens)
        rates["hf"].append(r)
    del dense, hf_bench
    ours, hf = max(rates["ours"]), max(rates["hf"])
    same = sum(a == b for a, b in zip(our_ids, hf_ids, strict=False))
    first = next((i for i, (a, b) in enumerate(zip(our_ids, hf_ids, strict=False)) if a != b), None)
    served = None if args.no_server or device.type != "cpu" else bench_server(args.tokens, args.threads)
    prompt_ids = files.tokenizer.encode(files.template.render(PROMPT))
    llama = (
        None if files.format != "gguf" else bench_llama_cpp(str(files.files[0]), prompt_ids, args.tokens, args.threads)
    )

    cpu = platform.processor() or platform.machine()
    if device.type == "cuda":
        cpu = torch.cuda.get_device_name(device)
    print(
        f"# {entry.id} ({files.format}, {dtype}, quantize={args.quantize}) on {device} [{cpu}], {args.threads} threads, "
        f"{args.tokens} tokens, torch {torch.__version__}"
    )

    def spread(k: str) -> str:
        v = rates[k]
        return f"{max(v):8.1f} tok/s (best of {len(v)}; range {min(v):.1f}-{max(v):.1f})"

    print(f"cortex model (in-process)  {spread('ours')}")
    if rates["dense"]:
        print(f"cortex model, quantize=none {spread('dense')}")
    if served is not None:
        print(f"cortex serve (HTTP, SSE)   {served:8.1f} tok/s")
    print(f"HF transformers generate   {spread('hf')}")
    print(f"ratio cortex model / HF    {ours / hf:8.2f}x (best / best)")
    if rates["dense"]:
        print(f"ratio packed / quantize=none {ours / max(rates['dense']):6.2f}x")
    if served is not None:
        print(f"ratio cortex serve / HF    {served / hf:8.2f}x")
    if llama is None:
        print("llama.cpp                   skipped (make bench-deps installs llama-cpp-python)")
    else:
        print(f"llama.cpp (Q4_1 GGUF)      {llama:8.1f} tok/s")
        print(f"ratio cortex model / llama.cpp {ours / llama:5.2f}x")
    print(f"greedy tokens identical to HF: {same}/{len(our_ids)} (first difference at: {first})")
    if rates["dense"]:
        same_dense = sum(a == b for a, b in zip(dense_ids, hf_ids, strict=False))
        print(f"greedy tokens identical to HF with quantize=none: {same_dense}/{len(dense_ids)}")


if __name__ == "__main__":
    main()

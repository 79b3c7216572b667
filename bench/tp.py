"""Tensor-parallel decode: tokens/s and per-step communication time for TP=1 and TP=2 (or any N).

    .venv/bin/python bench/tp.py --devices cpu,cpu              # gloo on the CPU
    python3 bench/tp.py --devices cuda:0 --shape qwen3-0.6b --hf  # NCCL on one GPU, vs HF transformers

Each rank is a process of its own, as in cortex. The model has the real shape named by --shape and
random weights (speed does not depend on the values). Every group, even a one-rank group, is a real
communicator (gloo or NCCL), so the all-reduce path is exercised and timed. With --hf, TP=1 is also
compared with HF transformers' generate on the same weights and device.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    # name: (arch, vocab, hidden, inter, layers, heads, kv heads, head_dim, tied)
    "tiny": ("qwen3", 512, 64, 128, 2, 4, 2, 32, True),
    "smollm2-135m": ("llama", 49152, 576, 1536, 30, 9, 3, 64, True),
    "qwen3-0.6b": ("qwen3", 151936, 1024, 3072, 28, 16, 8, 128, True),
    "qwen3-1.7b": ("qwen3", 151936, 2048, 6144, 28, 16, 8, 128, True),
}


def model_config(shape: str):
    from workers.arch.config import ModelConfig

    arch, vocab, hidden, inter, layers, heads, kv, hd, tied = SHAPES[shape]
    return ModelConfig(
        arch=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=hd,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=4096,
        tie_word_embeddings=tied,
        qk_norm=arch == "qwen3",
    )


def _rank(*args):
    out = args[-1]
    try:
        _rank_bench(*args)
    except Exception as exc:  # reported by the parent instead of a silent hang
        out.put((args[0], None, f"{type(exc).__name__}: {exc}"))


def _rank_bench(rank, world, port, device, shape, dtype_name, tokens, prompt_len, threads, save_to, out):
    import torch

    from workers.arch import model_class
    from workers.kv_cache import LocalRunner
    from workers.parallel import TPGroup

    torch.set_num_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dtype = getattr(torch, dtype_name)
    cfg = model_config(shape)
    tp = TPGroup.connect(rank, world, f"127.0.0.1:{port}", dev, timeout_s=120)
    comm = [0.0]
    reduce = tp.all_reduce

    def timed(t):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        reduce(t)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        comm[0] += time.perf_counter() - t0
        return t

    tp.all_reduce = timed
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.device(dev):
        model = model_class(cfg)(cfg, tp, dtype)
    for p in model.parameters():  # same values on every rank for the replicated ones
        p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(dtype))
    run = LocalRunner(model, dev, num_blocks=(prompt_len + tokens + 16) // 16 + 2)
    prompt = [i % cfg.vocab_size for i in range(prompt_len)]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def decode(n):
        tok = int(run.step(0, prompt, 0).argmax())
        sync()
        comm[0] = 0.0
        t0 = time.perf_counter()
        for i in range(n):
            tok = int(run.step(0, [tok], prompt_len + i).argmax())
        sync()
        return time.perf_counter() - t0

    decode(8)  # warm-up
    took = decode(tokens)
    if save_to and world == 1:  # for the HF comparison: the very same weights
        torch.save({k: v.cpu() for k, v in model.hf_state_dict().items()}, save_to)
    out.put((rank, tokens / took, comm[0] / tokens))


def run(world, devices, args, save_to=""):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        ctx.Process(
            target=_rank,
            args=(
                r,
                world,
                port,
                devices[r],
                args.shape,
                args.dtype,
                args.tokens,
                args.prompt,
                args.threads,
                save_to,
                out,
            ),
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results = sorted([out.get(timeout=900) for _ in procs], key=lambda x: x[0])
    for p in procs:
        p.join()
    errors = [r[2] for r in results if r[1] is None]
    if errors:
        sys.exit(f"TP={world}: {errors[0]}")
    return results[0]


def hf_rate(state_path, args) -> float:
    import torch

    from bench.hf import hf_twin

    c = model_config(args.shape)
    dev = torch.device(args.devices.split(",")[0])
    hf = hf_twin(c, torch.load(state_path), dev, getattr(torch, args.dtype))
    ids = (torch.arange(args.prompt, device=dev) % c.vocab_size)[None]

    def gen(n):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    gen(4)
    return (args.tokens - 1) / (gen(args.tokens) - gen(1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", default="cpu,cpu", help="comma-separated; TP runs for 1..N of them")
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--dtype", default=None)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument("--hf", action="store_true", help="also time HF transformers at TP=1")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    devices = args.devices.split(",")
    args.dtype = args.dtype or ("float32" if devices[0] == "cpu" else "bfloat16")

    import torch

    where = torch.cuda.get_device_name(0) if devices[0].startswith("cuda") else "cpu"
    backend = "nccl" if devices[0].startswith("cuda") else "gloo"
    print(
        f"# {args.shape} ({args.dtype}) on {devices} [{where}], {backend}, {args.tokens} tokens, "
        f"torch {torch.__version__}, {args.threads} thread(s)/rank"
    )
    rows = []
    sizes = sorted({1, len(devices)})
    state = str(Path(tempfile.mkdtemp()) / "weights.pt") if args.hf else ""
    for n in sizes:
        _, rate, comm = run(n, devices, args, state)
        rows.append({"tp": n, "tok_s": rate, "comm_ms_per_step": comm * 1e3})
        print(
            f"TP={n}: {rate:8.1f} tok/s   all-reduce {comm * 1e3:7.3f} ms/step ({2 * SHAPES[args.shape][4]} per step)"
        )
    result = {"shape": args.shape, "devices": devices, "device_name": where, "rows": rows}
    if args.hf:
        hf = hf_rate(state, args)
        result["hf_tok_s"] = hf
        print(f"HF transformers: {hf:8.1f} tok/s   cortex TP=1 / HF = {rows[0]['tok_s'] / hf:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

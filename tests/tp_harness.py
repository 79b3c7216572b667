"""Run a model with tensor parallelism across real processes (gloo on CPU) and collect rank 0's logits."""

from __future__ import annotations

import multiprocessing as mp
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, ckpt: str, prompt: list[int], steps: list[int], out) -> None:
    import torch

    from workers.arch import ModelConfig, model_class
    from workers.kv_cache import LocalRunner
    from workers.parallel import TPGroup
    from workers.weights import load_weights

    torch.set_num_threads(1)
    try:
        tp = TPGroup.connect(rank, world, f"127.0.0.1:{port}", torch.device("cpu"), timeout_s=300)
        cfg = ModelConfig.from_hf_dir(Path(ckpt))
        model = model_class(cfg)(cfg, tp)
        load_weights(model, "safetensors", [str(p) for p in sorted(Path(ckpt).glob("*.safetensors"))])
        run = LocalRunner(model, torch.device("cpu"))
        logits = [run.step(0, prompt, 0, all_logits=True)]
        pos = len(prompt)
        for tok in steps:  # decode the given tokens one by one
            logits.append(run.step(0, [tok], pos)[None])
            pos += 1
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        out.put((rank, [t.tolist() for t in logits], param_bytes, None))
    except Exception as exc:  # reported to the test, which fails with it
        out.put((rank, None, 0, f"{type(exc).__name__}: {exc}"))


def run_tp(ckpt: Path, world: int, prompt: list[int], steps: list[int], timeout: float = 300):
    """Return (rank 0's logits per step, resident parameter bytes per rank)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, str(ckpt), prompt, steps, out)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=timeout) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    errors = [e for _, _, _, e in results if e]
    if errors:
        raise RuntimeError("; ".join(errors))
    by_rank = {r: (logits, nbytes) for r, logits, nbytes, _ in results}
    return by_rank[0][0], [by_rank[r][1] for r in range(world)]

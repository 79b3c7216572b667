"""Run a model with tensor parallelism across real processes (gloo on CPU) and collect rank 0's logits:
``run_tp`` drives the model itself, one sequence; ``run_tp_steps`` drives each rank's ``Worker`` with
the leader's requests (``LoadDenseShard``, then ``GenerateStep`` per step), several sequences per
step with state slots for hybrid models."""

from __future__ import annotations

import multiprocessing as mp
import socket
from dataclasses import dataclass
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
        out.put((rank, ([t.tolist() for t in logits], param_bytes), None))
    except Exception as exc:  # reported to the test, which fails with it
        out.put((rank, None, f"{type(exc).__name__}: {exc}"))


def run_tp(ckpt: Path, world: int, prompt: list[int], steps: list[int], timeout: float = 300):
    """Return (rank 0's logits per step, resident parameter bytes per rank)."""
    results = _spawn(_rank_main, world, (str(ckpt), prompt, steps), timeout)
    return results[0][0], [nbytes for _, nbytes in results]


# -- through the worker's own requests ----------------------------------------------------------------

# One sequence's part of one step: (seq id, tokens or None, start position, state slot, sample). None
# stands for the token rank 0 sampled for that sequence on its previous step (greedy feedback), which
# only a lone rank can know: a group is given the tokens a lone rank chose.
Part = tuple  # (int, list[int] | None, int, int, bool)


def _worker_rank_main(rank, world, port, ckpt, plan, kv_blocks, state_slots, quantize, out) -> None:
    import torch

    from rpc.messages import Error, GenerateStep, LoadDenseShard, SamplingParams, SeqInput
    from workers.arch import ModelConfig
    from workers.worker import Worker

    torch.set_num_threads(1)
    try:
        worker = Worker("cpu")
        loaded = worker.handle(
            LoadDenseShard(
                model_id="m",
                format="safetensors",
                files=[str(p) for p in sorted(Path(ckpt).glob("*.safetensors"))],
                config=ModelConfig.from_hf_dir(Path(ckpt)).to_dict(),
                dtype="float32",
                rank=rank,
                world_size=world,
                dist_address=f"127.0.0.1:{port}" if world > 1 else "",
                group_timeout_s=300,
                kv_blocks=kv_blocks,
                state_slots=state_slots,
                quantize=quantize,
            )
        )
        if isinstance(loaded, Error):
            raise RuntimeError(loaded.message)
        captured = []  # the logits each step's forward returned ([sequences, vocab])
        worker.models["m"].model.register_forward_hook(lambda _m, _a, logits: captured.append(logits.tolist()))
        # each sequence's KV blocks: its own run of ids, wide enough for every position it reaches
        ends: dict[int, int] = {}
        for step in plan:
            for seq, tokens, start, _, _ in step:
                ends[seq] = max(ends.get(seq, 0), start + (1 if tokens is None else len(tokens)))
        tables, first = {}, 0
        for seq, end in sorted(ends.items()):
            width = -(-end // worker.models["m"].cache.block_size)
            tables[seq], first = list(range(first, first + width)), first + width
        greedy, last, sampled = SamplingParams(temperature=0), {}, []
        for step in plan:
            seqs = []
            for seq, tokens, start, slot, sample in step:
                if tokens is None:
                    if world > 1:
                        raise ValueError("greedy feedback needs a lone rank: give a group the tokens")
                    tokens = [last[seq]]
                seqs.append(SeqInput(seq, tokens, start, greedy, tables[seq], sample, state_slot=slot))
            reply = worker.handle(GenerateStep(model_id="m", seqs=seqs))
            if isinstance(reply, Error):
                raise RuntimeError(reply.message)
            sampled.append(reply.tokens)
            for s, token in zip(seqs, reply.tokens, strict=True):
                if s.sample:
                    last[s.seq_id] = token
        out.put((rank, (captured, sampled, loaded.param_bytes, loaded.state_bytes), None))
    except Exception as exc:  # reported to the test, which fails with it
        out.put((rank, None, f"{type(exc).__name__}: {exc}"))


@dataclass
class RankRun:
    logits: list  # rank 0's logits of each step: [sequences of the step][vocab]
    tokens: list  # rank 0's sampled token of each sequence of each step (-1 where not sampled)
    param_bytes: list[int]  # per rank, as its Loaded reply says
    state_bytes: list[int]


def run_tp_steps(
    ckpt: Path, world: int, plan: list[list[Part]], state_slots: int, timeout: float = 300, quantize: str = "auto"
) -> RankRun:
    """Load ``ckpt`` on ``world`` worker processes with ``LoadDenseShard`` (``quantize`` as in
    models.toml) and run ``plan`` through ``GenerateStep``, one request per step as the leader sends
    it to every rank (``Worker.handle``, the code a served worker runs on each request, minus the
    socket)."""
    results = _spawn(_worker_rank_main, world, (str(ckpt), plan, 64, state_slots, quantize), timeout)
    logits, tokens, _, _ = results[0]
    return RankRun(logits, tokens, [r[2] for r in results], [r[3] for r in results])


def _spawn(target, world: int, args: tuple, timeout: float) -> list:
    """Run ``target(rank, world, port, *args, queue)`` in ``world`` fresh processes; each puts
    (rank, result, error). Returns the results by rank, or raises with every rank's error."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, out)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=timeout) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    errors = [f"rank {r}: {e}" for r, _, e in sorted(results, key=lambda x: x[0]) if e]
    if errors:
        raise RuntimeError("; ".join(errors))
    return [res for _, res, _ in sorted(results, key=lambda x: x[0])]


def with_sampled_tokens(plan: list[list[tuple]], sampled: list[list[int]]) -> list[list[tuple]]:
    """A ``run_tp_steps`` plan with each None token replaced by the token sampled for that sequence
    on its previous step (``sampled``: the tokens of a run of the same plan, step by step)."""
    last, out = {}, []
    for step, tokens in zip(plan, sampled, strict=True):
        out.append([(seq, [last[seq]] if t is None else t, *rest) for seq, t, *rest in step])
        last.update((seq, tok) for (seq, *_), tok in zip(step, tokens, strict=True) if tok >= 0)
    return out


def rel_err(a, b) -> float:
    """Largest absolute difference over the largest magnitude of ``a``."""
    import torch

    a, b = torch.tensor(a), torch.tensor(b)
    return ((a - b).abs().max() / a.abs().max()).item()

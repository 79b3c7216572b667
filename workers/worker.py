"""The worker process: one per device. Serves msgpack RPC on a ZeroMQ ROUTER socket.

Single-threaded on purpose: one request at a time, each answered before the next is read, so the
leader's view of what the worker holds is always exact. Every failure becomes an ``Error`` reply.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field

from rpc.messages import (
    Ack,
    ClearKvCache,
    Embeddings,
    EmbedStep,
    Error,
    ErrorKind,
    GenerateStep,
    LoadDenseShard,
    Loaded,
    Ping,
    Pong,
    ReleaseSequences,
    SeqInput,
    StepResult,
    Unload,
)
from rpc.process import die_with_parent
from rpc.transport import RpcServer
from workers import seams

log = logging.getLogger("cortex.worker")


@dataclass
class ResidentModel:
    model: object
    cache: object
    tp: object
    vocab_limit: int
    states: object = None  # the RecurrentStatePool of a hybrid model (None for plain decoders)
    generators: dict = field(default_factory=dict)  # seq id -> its own torch.Generator (or None: greedy)
    prompts: dict = field(default_factory=dict)  # seq id -> prompt tokens, for the repetition penalty
    outputs: dict = field(default_factory=dict)  # seq id -> tokens sampled so far, for penalties
    last: dict = field(default_factory=dict)  # seq id -> its latest sampled token (overlapped steps' input)
    step_failed: bool = False  # the latest step raised: an overlapped step queued behind it is void
    gpu: object = None  # workers.gpu.step.GpuPath on a GPU (graphs, device sampler); None: the CPU path


class Worker:
    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.models: dict[str, ResidentModel] = {}
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def handle(self, msg: object) -> object:
        handler = {
            Ping: self.ping,
            LoadDenseShard: self.load,
            GenerateStep: self.step,
            EmbedStep: self.embed,
            ClearKvCache: self.clear,
            ReleaseSequences: self.release,
            Unload: self.unload,
        }.get(type(msg))
        if handler is None:
            return Error(kind=ErrorKind.BAD_FRAME, message=f"{type(msg).__name__} is not a worker request")
        try:
            return handler(msg)
        except Exception as exc:  # a failed request must never kill the worker
            log.exception("%s failed", type(msg).__name__)
            kinds = {
                LoadDenseShard: ErrorKind.LOAD_FAILED,
                GenerateStep: ErrorKind.STEP_FAILED,
                EmbedStep: ErrorKind.STEP_FAILED,
            }
            kind = kinds.get(type(msg), ErrorKind.INTERNAL)
            return Error(kind=kind, message=f"{type(exc).__name__}: {exc}")

    def ping(self, msg: Ping) -> Pong:
        total, free = self._memory()
        return Pong(os.getpid(), str(self.device), sorted(self.models), total, free)

    def _memory(self) -> tuple[int, int]:
        """(total, free) bytes of this worker's device: VRAM on a GPU, the host's RAM on the CPU."""
        if self.device.type == "cuda":
            free, total = self.torch.cuda.mem_get_info(self.device)
            return int(total), int(free)
        return host_memory()

    def load(self, msg: LoadDenseShard) -> Loaded | Error:
        from workers import hugepages, native
        from workers.arch import ModelConfig, model_class
        from workers.gpu import memory as gpu_memory
        from workers.gpu import step as gpu_step
        from workers.kv_cache import PagedKVCache
        from workers.parallel import TPGroup
        from workers.weights import load_weights

        torch = self.torch
        if msg.model_id in self.models:
            return Error(kind=ErrorKind.LOAD_FAILED, message=f"model {msg.model_id!r} is already loaded on this worker")
        seams.before_load()
        cfg = ModelConfig.from_dict(msg.config)
        dtype = getattr(torch, msg.dtype)
        t0 = time.monotonic()
        tp = TPGroup.connect(msg.rank, msg.world_size, msg.dist_address, self.device, msg.group_timeout_s)
        with torch.device(self.device):
            model = model_class(cfg)(cfg, tp, dtype, name=msg.model_id)
        log.info("loading %s (%s, %d layers, %s) on %s", msg.model_id, cfg.arch, cfg.num_layers, msg.dtype, self.device)
        # packed weight-only quantized linears on the CPU ("auto": a GGUF file's own 4-bit blocks);
        # a LoadDenseShard without a quantize field gets "auto"
        quantize = getattr(msg, "quantize", "auto")
        load_weights(model, msg.format, msg.files, _progress_logger(msg.model_id), quantize, self.device.type)
        model.eval()
        huge = hugepages.move_to_huge_pages(model) if self.device.type == "cpu" else 0  # before any step
        layers, kv_heads, head_dim, _ = model.kv_shape()
        kv_dtype = getattr(torch, getattr(msg, "kv_dtype", "") or msg.dtype)  # the leader's [engine] kv_cache_dtype
        graphs = gpu_step.wants_graphs(self.device, msg, model)  # then one more block: the padding rows'
        kv_blocks = gpu_memory.kv_pool_blocks(self.device, msg, msg.kv_headroom, model, kv_dtype, graphs)
        cache = PagedKVCache(layers, kv_heads, head_dim, kv_dtype, self.device, kv_blocks + graphs)
        states, state_bytes = None, 0
        if getattr(model, "recurrent", False):  # hybrid: a fixed-size state per sequence, in slots
            states = model.new_state_pool(max(msg.state_slots, 1) + graphs, self.device)  # + the padding rows'
            state_bytes = states.nbytes()
        gpu = gpu_step.GpuPath.build(self.device, msg, model, cache, cfg.vocab_size, graphs, states)
        self.models[msg.model_id] = ResidentModel(model, cache, tp, msg.vocab_limit, states, gpu=gpu)
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        seconds = time.monotonic() - t0
        log.info(
            "loaded %s: %.1f MB of weights in %.1fs (%.1f MB of them in huge pages); KV pool %.1f MB (%s); "
            "state pool %.1f MB; CPU kernels: %s",
            msg.model_id, param_bytes / 1e6, seconds, huge / 1e6, cache.nbytes() / 1e6,
            str(kv_dtype).removeprefix("torch."), state_bytes / 1e6,
            native.path_name() if self.device.type == "cpu" else "none (not on the CPU)",
        )  # fmt: skip
        return Loaded(
            model_id=msg.model_id,
            param_bytes=param_bytes,
            load_seconds=seconds,
            kv_blocks=cache.num_blocks - graphs,  # the padding block is never the leader's to hand out
            kv_bytes=cache.nbytes(),
            state_bytes=state_bytes,
            graph_bytes=gpu.reserved_bytes() if gpu else 0,
        )

    def step(self, msg: GenerateStep) -> StepResult | Error:
        rm = self.models.get(msg.model_id)
        if rm is None:
            return Error(kind=ErrorKind.UNKNOWN_MODEL, message=f"model {msg.model_id!r} is not loaded on this worker")
        if msg.steps > 1 and not all(_multistep_row(s) for s in msg.seqs):
            return Error(kind=ErrorKind.BAD_FRAME, message="a multi-step is plain decodes only (no mask, no logprobs)")
        followed = [s for s in msg.seqs if s.follows]
        if followed and rm.step_failed:  # the leader dropped it with the failed one: no collective for it
            return Error(kind=ErrorKind.STEP_FAILED, message="the step this one follows failed")
        rm.step_failed = True  # until this step returns
        seams.before_step()
        if followed:
            self._fill_followed(rm, followed)
        out, logprobs, errors = self._forward_and_sample(rm, msg.seqs)
        more = self._more_steps(rm, msg, out, errors) if msg.steps > 1 else None
        rm.step_failed = False
        return StepResult(
            model_id=msg.model_id,
            tokens=out,
            logprobs=logprobs if any(x is not None for x in logprobs) else None,
            errors=errors if any(errors) else None,
            more=more,
        )

    def _forward_and_sample(self, rm: ResidentModel, seqs: list[SeqInput]) -> tuple[list, list, list]:
        """One forward of the step's sequences and their samples: (token, logprobs, error) each."""
        logits = None if rm.gpu is None else rm.gpu.decode(seqs)  # a CUDA graph's replay; None: eager
        if logits is None:
            logits = self._forward(rm, seqs)
        if rm.gpu is not None and rm.tp.rank == 0:  # the whole batch on the device, one transfer
            out, logprobs, errors = rm.gpu.sampler.sample(logits, seqs)
        else:
            out, logprobs, errors = self._sample_rows(rm, seqs, logits)
        for s, token in zip(seqs, out, strict=True):
            if token >= 0:
                rm.last[s.seq_id] = token
        return out, logprobs, errors

    def _more_steps(self, rm: ResidentModel, msg: GenerateStep, first: list[int], errors: list[str]) -> list[list[int]]:
        """A multi-step's forwards after its first (``GenerateStep.steps``), each sequence fed what it
        sampled, until every sequence has sampled a stop id (or failed). Rank 0 samples; the other
        ranks get its tokens in a broadcast per forward, so every rank stops at the same one."""
        seqs = msg.seqs
        stops = [frozenset(s.stop_ids or ()) for s in seqs]
        ended = [False] * len(seqs)
        more: list[list[int]] = [[] for _ in seqs]
        sampled = first
        for _ in range(msg.steps - 1):
            sampled = self._share_tokens(rm, [-1 if e else t for t, e in zip(sampled, errors, strict=True)])
            ended = [done or t < 0 or t in stop for done, t, stop in zip(ended, sampled, stops, strict=True)]
            if all(ended):
                break
            for s, token, done in zip(seqs, sampled, ended, strict=True):
                s.sample = not done  # an ended row's forwards are wasted; its samples would be too
                s.start_pos, s.tokens = s.start_pos + len(s.tokens), [max(token, 0)]  # a dead one: any token
                s.prompt, s.state_from, s.state_save, s.follows = None, -1, -1, False
            sampled, _, now_failed = self._forward_and_sample(rm, seqs)
            for i, (token, error) in enumerate(zip(sampled, now_failed, strict=True)):
                more[i].append(-1 if errors[i] or error else token)
                errors[i] = errors[i] or error
        return more

    def _share_tokens(self, rm: ResidentModel, tokens: list[int]) -> list[int]:
        """Rank 0's sampled tokens on every rank of the model's group (as they are with one rank); a
        device tensor, since NCCL broadcasts those only."""
        if rm.tp.world_size == 1:
            return tokens
        return rm.tp.broadcast(self.torch.tensor(tokens, dtype=self.torch.int64, device=self.device)).tolist()

    def _fill_followed(self, rm: ResidentModel, seqs: list[SeqInput]) -> None:
        """An overlapped step's rows feed the token their sequence sampled last step. Rank 0 sampled
        it: the other ranks of a tensor-parallel group get it from rank 0, in one small broadcast.
        A sequence whose sampling failed last step is dead (its request failed): any token serves."""
        tokens = self._share_tokens(rm, [rm.last.get(s.seq_id, 0) for s in seqs])
        for s, token in zip(seqs, tokens, strict=True):
            s.tokens = [token]

    def _forward(self, rm: ResidentModel, seqs: list[SeqInput]):
        """The step's last logits [sequences, vocab], run eagerly."""
        from workers.kv_cache import StepBatch

        rows = [(s.tokens, s.start_pos, s.block_table) for s in seqs]
        batch = StepBatch.build(rows, rm.cache.block_size, self.device)
        if rm.states is None:
            return rm.model(batch, rm.cache)  # one forward for every sequence of the step
        states = self._state_batch(rm, seqs)  # checked, and saved prefix states restored
        logits = rm.model(batch, rm.cache, rm.states, states)
        for s in seqs:  # after the whole step: a slot restored from above is read first
            if s.state_save >= 0:
                rm.states.copy(s.state_slot, [s.state_save])
        return logits

    def _sample_rows(self, rm: ResidentModel, seqs: list[SeqInput], logits) -> tuple[list, list, list]:
        """(token, logprobs, error) per sequence, one row at a time on the host's schedule."""
        from workers.sampling import plain_greedy

        if rm.tp.rank == 0 and all(plain_greedy(s.sampling, s.allowed) for s in seqs):
            return self._greedy_rows(rm, seqs, logits)
        out, logprobs, errors = [], [], []
        for i, s in enumerate(seqs):
            if s.prompt is not None:
                rm.prompts[s.seq_id] = s.prompt
            token, lp, error = -1, None, ""
            if s.sample and rm.tp.rank == 0:
                try:
                    token, lp = self._sample(rm, s, logits[i])
                except Exception as exc:  # this sequence's request fails; the step's others go on
                    log.exception("sampling sequence %d failed", s.seq_id)
                    error = f"{type(exc).__name__}: {exc}"
            out.append(token)
            logprobs.append(lp)
            errors.append(error)
        return out, logprobs, errors

    def _greedy_rows(self, rm: ResidentModel, seqs: list[SeqInput], logits) -> tuple[list, list, list]:
        """Every row greedy, with nothing else to apply: the whole step's picks in one NumPy scan
        (``sampling.greedy``'s rule per row), not a sampler call per row, which at one stream cost
        some 50 us of a 4 ms step while the step's other threads wait."""
        from workers.sampling import greedy_rows

        picked = greedy_rows(logits, rm.vocab_limit)
        out = [token if s.sample else -1 for s, token in zip(seqs, picked, strict=True)]
        return out, [None] * len(seqs), [""] * len(seqs)

    def _state_batch(self, rm: ResidentModel, seqs: list[SeqInput]):
        """Each sequence's state slot; a sequence computing its position 0 starts from zero, one
        resuming a cached prefix from the saved state copied into its slot here."""
        from workers.arch.deltanet import StateBatch

        slots = rm.states.num_slots
        for s in seqs:
            for what, slot in (
                ("state slot", s.state_slot),
                ("saved state", s.state_from),
                ("save slot", s.state_save),
            ):
                if not (0 <= slot < slots or (what != "state slot" and slot == -1)):
                    raise ValueError(f"sequence {s.seq_id}: {what} {slot} is not one of {slots}")
        for s in seqs:
            if s.state_from >= 0:
                rm.states.copy(s.state_from, [s.state_slot])
        lengths, slots = [len(s.tokens) for s in seqs], [s.state_slot for s in seqs]
        return StateBatch.build(lengths, slots, [s.start_pos == 0 for s in seqs], self.device)

    def _sample(self, rm: ResidentModel, s: SeqInput, logits) -> tuple[int, list | None]:
        """One sequence's next token, and its logprobs when asked for."""
        from workers.sampling import new_generator, sample, token_logprobs

        if s.seq_id not in rm.generators:  # its own generator: reproducible whatever else runs
            rm.generators[s.seq_id] = new_generator(s.sampling, self.device)
        output = rm.outputs.setdefault(s.seq_id, [])
        token = sample(
            logits,
            s.sampling,
            rm.generators[s.seq_id],
            rm.vocab_limit,
            rm.prompts.get(s.seq_id, ()),
            output,
            s.allowed,
        )
        output.append(token)
        want = s.sampling.logprobs
        return token, token_logprobs(logits, token, want, rm.vocab_limit) if want >= 0 else None

    def embed(self, msg: EmbedStep) -> Embeddings | Error:
        """Each sequence's last-token hidden state after the final norm, L2-normalised. The KV
        lives in scratch pools of the model's compute dtype (the pooled vector then equals the
        reference's in float32), sized for the sequences of one group and freed after it."""
        rm = self.models.get(msg.model_id)
        if rm is None:
            return Error(kind=ErrorKind.UNKNOWN_MODEL, message=f"model {msg.model_id!r} is not loaded on this worker")
        torch = self.torch
        if getattr(rm.model, "recurrent", False):
            raise NotImplementedError("embeddings of a model with recurrent layers")
        if any(not s for s in msg.seqs):
            raise ValueError("an embedding sequence holds no token")
        budget = msg.chunk_tokens or max(len(s) for s in msg.seqs)
        vectors = []
        for group in _groups([len(s) for s in msg.seqs], budget):
            vectors += self._embed_group(rm, [msg.seqs[i] for i in group], budget)
        out = torch.nn.functional.normalize(torch.stack(vectors).float(), dim=-1)
        dim = out.shape[-1]
        if rm.tp.rank != 0:
            return Embeddings(msg.model_id, dim, b"")
        return Embeddings(msg.model_id, dim, out.cpu().numpy().astype("<f4").tobytes())

    def _embed_group(self, rm: ResidentModel, seqs: list[list[int]], budget: int) -> list:
        """Final-norm states of the last tokens of ``seqs``, run together through one scratch pool,
        at most ``budget`` tokens per forward."""
        from workers.kv_cache import PagedKVCache, StepBatch

        layers, kv_heads, head_dim, dtype = rm.model.kv_shape()
        size = rm.cache.block_size
        widths = [-(-len(s) // size) for s in seqs]
        scratch = PagedKVCache(layers, kv_heads, head_dim, dtype, self.device, sum(widths), size)
        starts = [sum(widths[:i]) for i in range(len(seqs))]
        tables = [list(range(start, start + w)) for start, w in zip(starts, widths, strict=True)]
        done, out = [0] * len(seqs), [None] * len(seqs)
        while any(d < len(s) for d, s in zip(done, seqs, strict=True)):
            rows, which, left = [], [], budget
            for i, s in enumerate(seqs):
                if done[i] < len(s) and left > 0:
                    piece = s[done[i] : done[i] + left]
                    rows.append((piece, done[i], tables[i]))
                    which.append(i)
                    left -= len(piece)
            hidden = rm.model(StepBatch.build(rows, size, self.device), scratch, hidden=True)
            for j, i in enumerate(which):
                done[i] += len(rows[j][0])
                if done[i] == len(seqs[i]):
                    out[i] = hidden[j]
        return out

    def clear(self, msg: ClearKvCache) -> Ack:
        rm = self.models.get(msg.model_id)
        if rm is not None:  # else nothing is held for it: clearing is done (idempotent, like Unload)
            rm.cache.clear(msg.blocks)
        return Ack()

    def release(self, msg: ReleaseSequences) -> Ack:
        rm = self.models.get(msg.model_id)
        if rm is None:
            return Ack()  # nothing held for it: forgetting is done (idempotent, like Unload)
        for state in (rm.generators, rm.prompts, rm.outputs, rm.last):
            if msg.seq_ids is None:
                state.clear()
            else:
                for s in msg.seq_ids:
                    state.pop(s, None)
        if rm.gpu is not None:
            rm.gpu.sampler.release(msg.seq_ids)
        return Ack()

    def unload(self, msg: Unload) -> Ack:
        rm = self.models.pop(msg.model_id, None)
        if rm is None:
            return Ack()  # idempotent: the leader may retry an unload after a timeout
        rm.tp.close()
        del rm
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
        log.info("unloaded %s", msg.model_id)
        return Ack()


def _multistep_row(s: SeqInput) -> bool:  # one token to feed, a plain sample: no mask, no logprobs
    return s.sample and len(s.tokens) == 1 and s.allowed is None and s.sampling.logprobs < 0


def _groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive sequences packed while their tokens fit ``budget`` (a longer one alone)."""
    groups: list[list[int]] = []
    total = 0
    for i, n in enumerate(lengths):
        if groups and total + n <= budget:
            groups[-1].append(i)
            total += n
        else:
            groups.append([i])
            total = n
    return groups


def host_memory() -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo; (0, 0) where there is none."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
    except OSError:
        return 0, 0
    kib = lambda key: int(fields.get(key, "0 kB").split()[0]) * 1024  # noqa: E731
    return kib("MemTotal"), kib("MemAvailable")


def _progress_logger(model_id: str):
    last = [-1]

    def report(done: int, total: int) -> None:
        pct = done * 100 // total
        if pct // 10 != last[0] // 10 or done == total:
            last[0] = pct
            log.info("loading %s: %d%% (%d/%d tensors)", model_id, pct, done, total)

    return report


def serve(endpoint: str, device: str, threads: int = 0) -> None:
    die_with_parent(signal.SIGKILL)  # no worker outlives its leader
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the leader decides when we stop
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    worker = Worker(device)
    if threads:
        worker.torch.set_num_threads(threads)
    server = RpcServer(endpoint)
    log.info("worker %d serving %s on %s", os.getpid(), device, endpoint)
    if device == "cpu":
        from workers import cpu  # imports torch, as the Worker above has

        log.info("CPU: %s", cpu.describe())
    while True:
        got = server.recv()
        if got is None:
            continue
        peer, msg_id, msg = got
        if msg is None:
            continue  # malformed frame, already answered with an Error
        server.reply(peer, msg_id, worker.handle(msg))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="cortex-worker")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--standby", action="store_true", help="import everything, then serve once told on stdin")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format=f"%(asctime)s %(levelname)s worker[{args.device}] %(message)s", stream=sys.stderr
    )
    if args.standby and not stand_by(args.device):
        return
    serve(args.endpoint, args.device, args.threads)


def stand_by(device: str) -> bool:
    """A spare worker (cortex/supervisor.py): do the slow part of a start now (Python, torch, the
    model code, the CPU kernels), then wait for the leader's word on stdin. True: serve; False: the
    leader closed stdin without a word (it stopped) and this process should exit."""
    die_with_parent(signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch  # noqa: F401

    from workers import arch, kv_cache, parallel, quant, weights  # noqa: F401

    if device == "cpu":
        from workers import native

        native.kernels()
    return sys.stdin.readline().strip() == "serve"


if __name__ == "__main__":
    main()

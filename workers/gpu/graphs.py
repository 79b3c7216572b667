"""Decode steps as CUDA graphs: one graph per batch-size bucket, replayed every step.

A decode step of a small model on a GPU is hundreds of kernel launches of a few microseconds each;
launched one by one from Python the step is bound by the host (about 10 tokens/s measured on an
H100 for a 0.6B model whose memory bound is about 2,800). A captured graph launches them all at
once. Graphs fix their shapes and addresses, so:

- inputs live in static buffers (token ids, positions, KV slots, block tables, context lengths),
  sized once for ``max_batch`` rows of ``max_blocks`` blocks, filled from one pinned host buffer
  with one copy per step; the logits come back in a static output buffer;
- batch sizes are rounded up to a bucket (1, 2, 4, 8, ... up to ``max_batch``), one graph each;
  padding rows decode token 0 at position 0 against one scratch block (``pad_block``, which the
  caller reserves: never handed to a sequence) and their logits are dropped;
- prefill and mixed steps, and batches above the largest bucket, run eagerly;
- a hybrid model (recurrent state, workers/arch/deltanet.py) also gets each row's state slot in a
  static buffer: the step reads and writes the pool's slots through it, in place, so the graph
  serves whichever sequences fill the rows. Padding rows use one scratch slot (``pad_slot``, also
  the caller's to reserve);
- a tensor-parallel step captures its all-reduces (NCCL supports capture): every rank builds the
  same buckets from the same ``max_batch``, captures them in the same order and pads a step the
  same way, so the collectives of a replay pair up across ranks.

The graphs of every bucket share one memory pool, captured largest first, so the pool is the
largest bucket's activations; ``reserved_bytes`` reports it with the static buffers, for the
KV budget. Without CUDA nothing is captured and ``run`` executes the same padded step eagerly:
the bookkeeping is tested on the CPU.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from workers.arch.deltanet import RecurrentStatePool, StateBatch
from workers.kv_cache import PagedKVCache, StepBatch

log = logging.getLogger(__name__)

# the model: a step's last logits [B, V]; a hybrid model also takes its state pool and a StateBatch
Forward = Callable[..., torch.Tensor]


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch``, then ``max_batch`` itself: at most 2x padding."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, not {max_batch}")
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return (*sizes, max_batch)


def pick_bucket(n: int, sizes: Sequence[int]) -> int | None:
    """The smallest bucket holding ``n`` rows; None when ``n`` exceeds them all (run eagerly)."""
    return next((b for b in sizes if b >= n), None)


@dataclass
class StaticInputs:
    """The step's inputs at fixed addresses: [max_batch] each, tables [max_batch, max_blocks]."""

    tokens: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    lengths: torch.Tensor
    tables: torch.Tensor
    rows: torch.Tensor  # 0 .. max_batch - 1: every row decodes and is sampled
    state_slots: torch.Tensor | None = None  # a hybrid model's: each row's state slot

    @classmethod
    def allocate(
        cls, max_batch: int, max_blocks: int, device: torch.device, pin: bool = False, recurrent: bool = False
    ) -> StaticInputs:
        def z(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.long, device=device, pin_memory=pin)

        rows = torch.arange(max_batch, dtype=torch.long, device=device)
        state_slots = z(max_batch) if recurrent else None
        return cls(z(max_batch), z(max_batch), z(max_batch), z(max_batch), z(max_batch, max_blocks), rows, state_slots)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values() if t is not None)

    def copy_(self, other: StaticInputs) -> None:
        for name in ("tokens", "positions", "slots", "lengths", "tables", "state_slots"):
            if getattr(self, name) is not None:
                getattr(self, name).copy_(getattr(other, name), non_blocking=True)

    def state_batch(self, n: int) -> StateBatch:
        """The first ``n`` rows as one-token sequences in their slots of the static buffer: no host
        data (no contiguous span either, which would fix this step's slots into the graph), and
        no fresh slot, as a decode step continues a state."""
        return StateBatch(fresh_slots=None, runs=[], single_rows=self.rows[:n], single_slots=self.state_slots[:n])

    def batch(self, n: int, block_size: int) -> StepBatch:
        """A decode StepBatch over the first ``n`` rows: views of the buffers, no host data, so a
        graph captured over it reads whatever the buffers hold at replay. The padding mask (read
        only by the PyTorch gather path) is computed from the lengths on the device: StepBatch's
        own checks whether any padding exists, a host sync that capture forbids."""
        tables = self.tables[:n]
        width = tables.shape[1] * block_size
        mask = (torch.arange(width, device=tables.device)[None, :] < self.lengths[:n, None])[:, None, None, :]
        fields = {f.name for f in dataclasses.fields(StepBatch)}
        kw = dict(
            tokens=self.tokens[:n], positions=self.positions[:n], slots=self.slots[:n], prefills=[],
            decode_rows=self.rows[:n], decode_blocks=tables, decode_lengths=self.lengths[:n], last_rows=self.rows[:n],
        )  # fmt: skip
        if "block_size" in fields:
            kw["block_size"] = block_size
        if "decode_mask" in fields:  # a plain field
            return StepBatch(**kw, decode_mask=mask)
        batch = StepBatch(**kw)
        batch.__dict__["decode_mask"] = mask  # a cached property: filled in before anything reads it
        return batch


def fill(
    host: StaticInputs,
    steps: Sequence[tuple[int, int, Sequence[int]]],
    bucket: int,
    block_size: int,
    pad_block: int,
    state_slots: Sequence[int] = (),
    pad_slot: int = 0,
) -> None:
    """Write ``steps`` ((token, position, block table) per sequence) into the host buffers, then
    pad to ``bucket`` rows with token 0 at position 0 in ``pad_block``; with a state slot buffer,
    ``state_slots`` (one per step) padded with ``pad_slot``. Built as Python lists and
    written with one op per buffer: a scalar tensor write costs microseconds, at 64 rows a
    millisecond of host time a step."""
    width = host.tables.shape[1]
    pad = bucket - len(steps)
    tokens, positions, slots, tables = [], [], [], []
    for i, (token, pos, table) in enumerate(steps):
        used = pos // block_size + 1
        if used > len(table) or used > width:
            raise ValueError(f"row {i}: position {pos} needs {used} blocks; table has {len(table)}, buffers {width}")
        tokens.append(token)
        positions.append(pos)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
        tables.append(list(table[:used]) + [pad_block] * (width - used))
    host.tokens[:bucket] = torch.tensor(tokens + [0] * pad)
    host.positions[:bucket] = torch.tensor(positions + [0] * pad)
    host.lengths[:bucket] = torch.tensor([p + 1 for p in positions] + [1] * pad)
    host.slots[:bucket] = torch.tensor(slots + [pad_block * block_size] * pad)
    host.tables[:bucket] = torch.tensor(tables + [[pad_block] * width] * pad)
    if host.state_slots is not None:
        if len(state_slots) != len(steps):
            raise ValueError(f"{len(steps)} rows but {len(state_slots)} state slots")
        host.state_slots[:bucket] = torch.tensor(list(state_slots) + [pad_slot] * pad)


class DecodeGraphs:
    """Decode steps of one model through per-bucket CUDA graphs (or eagerly, padded the same way)."""

    def __init__(
        self,
        forward: Forward,
        kv: PagedKVCache,
        max_batch: int,
        max_blocks: int,
        vocab: int,
        pad_block: int,
        buckets: Sequence[int] | None = None,
        states: RecurrentStatePool | None = None,
    ):
        """With ``states`` (a hybrid model's pool) the last slot is the padding rows' scratch."""
        self.forward, self.kv, self.states = forward, kv, states
        self.block_size, self.pad_block, self.vocab = kv.block_size, pad_block, vocab
        self.pad_slot = states.num_slots - 1 if states is not None else 0
        self.buckets = tuple(buckets) if buckets else bucket_sizes(max_batch)
        self.max_batch = max(self.buckets)
        device, recurrent = kv.k.device, states is not None
        self.static = StaticInputs.allocate(self.max_batch, max_blocks, device, recurrent=recurrent)
        self.host = StaticInputs.allocate(
            self.max_batch, max_blocks, torch.device("cpu"), pin=device.type == "cuda", recurrent=recurrent
        )
        self.logits = torch.zeros(self.max_batch, vocab, dtype=torch.float32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool_bytes = 0  # measured at capture: the graphs' shared memory pool

    def static_bytes(self) -> int:
        """Device memory of the static inputs and the logits buffer (held whether captured or not)."""
        return self.static.nbytes() + self.logits.numel() * self.logits.element_size()

    def reserved_bytes(self) -> int:
        """What the graphs hold on the device, to take from the KV budget."""
        return self.static_bytes() + self.pool_bytes

    def capture(self, warmup: int = 2) -> bool:
        """Warm up and capture every bucket, largest first, in one shared pool. Without CUDA, logs
        that decode steps stay eager and returns False."""
        if self.kv.k.device.type != "cuda" or not torch.cuda.is_available():
            log.info("CUDA graphs: no CUDA device, decode steps run eagerly")
            return False
        fill(self.host, [], self.max_batch, self.block_size, self.pad_block, (), self.pad_slot)  # all padding
        self.static.copy_(self.host)
        before = torch.cuda.memory_reserved()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for b in self.buckets:
                for _ in range(warmup):
                    self._step(b)
        torch.cuda.current_stream().wait_stream(side)
        for b in sorted(self.buckets, reverse=True):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._step(b)
            self.graphs[b] = graph
        torch.cuda.synchronize()
        self.pool_bytes = torch.cuda.memory_reserved() - before
        log.info(
            "CUDA graphs: %d buckets up to %d rows, %.1f MiB",
            len(self.graphs),
            self.max_batch,
            self.reserved_bytes() / 2**20,
        )
        return True

    def _step(self, n: int) -> None:
        batch = self.static.batch(n, self.block_size)
        if self.states is None:
            self.logits[:n] = self.forward(batch, self.kv)
        else:
            self.logits[:n] = self.forward(batch, self.kv, self.states, self.static.state_batch(n))

    def run(self, steps: Sequence[tuple[int, int, Sequence[int]]], state_slots: Sequence[int] = ()) -> torch.Tensor:
        """One decode step of ``steps`` ((token, position, block table) per sequence; a hybrid
        model's also in ``state_slots``, one each): the logits [len(steps), vocab] (a view of the
        static buffer: read or copy before the next step)."""
        n = len(steps)
        bucket = pick_bucket(n, self.buckets)
        if bucket is None:
            raise ValueError(f"{n} rows exceed the largest bucket ({self.max_batch}): run this step eagerly")
        fill(self.host, steps, bucket, self.block_size, self.pad_block, state_slots, self.pad_slot)
        self.static.copy_(self.host)
        graph = self.graphs.get(bucket)
        if graph is None:
            self._step(bucket)
        else:
            graph.replay()
        return self.logits[:n]

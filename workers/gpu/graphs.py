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
- prefill and mixed steps, and batches above the largest bucket, run eagerly.

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

from workers.kv_cache import PagedKVCache, StepBatch

log = logging.getLogger(__name__)

Forward = Callable[[StepBatch, PagedKVCache], torch.Tensor]  # the model: a step's last logits [B, V]


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

    @classmethod
    def allocate(cls, max_batch: int, max_blocks: int, device: torch.device, pin: bool = False) -> StaticInputs:
        def z(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.long, device=device, pin_memory=pin)

        rows = torch.arange(max_batch, dtype=torch.long, device=device)
        return cls(z(max_batch), z(max_batch), z(max_batch), z(max_batch), z(max_batch, max_blocks), rows)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values())

    def copy_(self, other: StaticInputs) -> None:
        for name in ("tokens", "positions", "slots", "lengths", "tables"):
            getattr(self, name).copy_(getattr(other, name), non_blocking=True)

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
    host: StaticInputs, steps: Sequence[tuple[int, int, Sequence[int]]], bucket: int, block_size: int, pad_block: int
) -> None:
    """Write ``steps`` ((token, position, block table) per sequence) into the host buffers, then
    pad to ``bucket`` rows with token 0 at position 0 in ``pad_block``. Built as Python lists and
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
    ):
        self.forward, self.kv = forward, kv
        self.block_size, self.pad_block, self.vocab = kv.block_size, pad_block, vocab
        self.buckets = tuple(buckets) if buckets else bucket_sizes(max_batch)
        self.max_batch = max(self.buckets)
        device = kv.k.device
        self.static = StaticInputs.allocate(self.max_batch, max_blocks, device)
        self.host = StaticInputs.allocate(self.max_batch, max_blocks, torch.device("cpu"), pin=device.type == "cuda")
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
        fill(self.host, [], self.max_batch, self.block_size, self.pad_block)  # every row a padding row
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
        self.logits[:n] = self.forward(self.static.batch(n, self.block_size), self.kv)

    def run(self, steps: Sequence[tuple[int, int, Sequence[int]]]) -> torch.Tensor:
        """One decode step of ``steps`` ((token, position, block table) per sequence): the logits
        [len(steps), vocab] (a view of the static buffer: read or copy before the next step)."""
        n = len(steps)
        bucket = pick_bucket(n, self.buckets)
        if bucket is None:
            raise ValueError(f"{n} rows exceed the largest bucket ({self.max_batch}): run this step eagerly")
        fill(self.host, steps, bucket, self.block_size, self.pad_block)
        self.static.copy_(self.host)
        graph = self.graphs.get(bucket)
        if graph is None:
            self._step(bucket)
        else:
            graph.replay()
        return self.logits[:n]

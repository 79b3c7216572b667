"""Paged KV cache: one pool of fixed-size blocks per model per rank; a sequence is a list of blocks.

Blocks (not one contiguous buffer per sequence) so sequences of any length share memory without
fragmentation, capacity is a fixed budget allocated once, and sequences with a common prefix can
share that prefix's blocks (the leader's prefix cache). The leader owns the block tables; the worker
only reads and writes the slots it is told to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_SIZE = 16


def bytes_per_block(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, block_size: int = BLOCK_SIZE) -> int:
    return 2 * layers * kv_heads * head_dim * block_size * torch.empty(0, dtype=dtype).element_size()


class PagedKVCache:
    """K and V for every layer: [layers, num_blocks * block_size, kv_heads, head_dim] (slot-major)."""

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        num_blocks: int,
        block_size: int = BLOCK_SIZE,
    ):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.k = torch.zeros(layers, num_blocks * block_size, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


@dataclass
class SeqSlice:
    """One sequence's part of a step, as the model needs it."""

    start: int  # first row of this sequence's tokens in the flat batch
    end: int
    context: torch.Tensor  # KV slot of every position 0 .. start_pos + n_tokens - 1

    @property
    def n(self) -> int:
        return self.end - self.start


@dataclass
class StepBatch:
    """The flat token batch of one step: prefill chunks and decode tokens of many sequences."""

    tokens: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] KV slot each new token writes
    prefills: list[SeqSlice]  # sequences with several new tokens: attention one by one
    decode_rows: torch.Tensor | None  # [B] rows of single-token sequences, batched together
    decode_slots: torch.Tensor | None  # [B, Lmax] their context slots, padded
    decode_mask: torch.Tensor | None  # [B, 1, 1, Lmax] True where a padded slot is real; None: no padding
    last_rows: torch.Tensor  # [S] the last row of every sequence (whose logits may be sampled)

    @classmethod
    def build(cls, seqs: list[tuple[list[int], int, list[int]]], block_size: int, device: torch.device) -> StepBatch:
        """``seqs``: (new tokens, start position, block table) for each sequence."""
        offsets = torch.arange(block_size)
        tokens, positions, slots, prefills, last = [], [], [], [], []
        decode_rows, decode_ctx = [], []
        row = 0
        for new, start, table in seqs:
            n, end_pos = len(new), start + len(new)
            blocks = -(-end_pos // block_size)
            if blocks > len(table):
                raise ValueError(f"block table of {len(table)} blocks cannot hold {end_pos} positions")
            # slot of every position 0 .. end_pos - 1: its block's first slot plus the offset in it
            context = (torch.tensor(table[:blocks])[:, None] * block_size + offsets).flatten()[:end_pos]
            tokens += new
            positions.append(torch.arange(start, end_pos))
            slots.append(context[start:])
            if n == 1:
                decode_rows.append(row)
                decode_ctx.append(context)
            else:
                prefills.append(SeqSlice(row, row + n, context.to(device)))
            row += n
            last.append(row - 1)
        t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        rows = slots_pad = mask = None
        if decode_rows:
            rows = t(decode_rows)
            lengths = torch.tensor([len(c) for c in decode_ctx])
            slots_pad = torch.nn.utils.rnn.pad_sequence(decode_ctx, batch_first=True).to(device)
            if lengths.min() != lengths.max():  # no padding (e.g. one sequence): no mask to apply
                mask = (torch.arange(slots_pad.shape[1])[None, :] < lengths[:, None])[:, None, None, :].to(device)
        return cls(
            t(tokens),
            torch.cat(positions).to(device),
            torch.cat(slots).to(device),
            prefills,
            rows,
            slots_pad,
            mask,
            t(last),
        )


class LocalRunner:
    """Drive a model sequence by sequence without a leader: for tests and benchmarks. (In the
    server, the leader's block manager owns block tables and batches many sequences per step.)"""

    def __init__(self, model, device: torch.device, num_blocks: int = 256):
        self.model, self.device = model, device
        self.cache = PagedKVCache(*model.kv_shape(), device, num_blocks)
        self.tables: dict[int, list[int]] = {}
        self.next_block = 0

    def step(self, seq_id: int, tokens: list[int], start_pos: int, all_logits: bool = False) -> torch.Tensor:
        """Logits of the last token ([vocab]) or of every new token ([n, vocab])."""
        table = self.tables.setdefault(seq_id, [])
        while len(table) * BLOCK_SIZE < start_pos + len(tokens):
            if self.next_block >= self.cache.num_blocks:
                raise RuntimeError("LocalRunner: out of KV blocks")
            table.append(self.next_block)
            self.next_block += 1
        batch = StepBatch.build([(tokens, start_pos, table)], BLOCK_SIZE, self.device)
        logits = self.model(batch, self.cache, all_logits=all_logits)
        return logits if all_logits else logits[0]

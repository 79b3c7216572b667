"""Per-sequence KV cache: one contiguous block per sequence, grown by doubling.

Simple and exact; memory is proportional to what each sequence really holds. Paged blocks come with
continuous batching.
"""

from __future__ import annotations

import torch


class SequenceKV:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.shape = (layers, kv_heads, 0, head_dim)
        self.k = torch.empty(layers, kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0  # positions holding valid keys/values

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reserve(self, total: int) -> None:
        if total <= self.capacity:
            return
        cap = max(total, 2 * self.capacity, 64)
        layers, heads, _, dim = self.k.shape
        k = torch.empty(layers, heads, cap, dim, dtype=self.k.dtype, device=self.k.device)
        v = torch.empty_like(k)
        k[:, :, : self.length] = self.k[:, :, : self.length]
        v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class KVCache:
    """All sequences of one model on this rank."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self._args = (layers, kv_heads, head_dim, dtype, device)
        self.seqs: dict[int, SequenceKV] = {}

    def for_step(self, seq_id: int, start_pos: int, n_new: int) -> SequenceKV:
        """The sequence's cache, ready to take ``n_new`` tokens at ``start_pos``.

        ``start_pos`` below what is stored rewinds the sequence (0 restarts it), so a retried or
        reused id never attends to stale positions.
        """
        seq = self.seqs.get(seq_id)
        if seq is None:
            if start_pos != 0:
                raise KeyError(f"sequence {seq_id} has no KV cache; a new sequence must start at position 0")
            seq = self.seqs[seq_id] = SequenceKV(*self._args)
        if start_pos > seq.length:
            raise ValueError(f"sequence {seq_id}: start_pos {start_pos} is past its {seq.length} cached tokens")
        seq.length = start_pos
        seq.reserve(start_pos + n_new)
        return seq

    def drop(self, seq_ids: list[int] | None) -> None:
        if seq_ids is None:
            self.seqs.clear()
        else:
            for s in seq_ids:
                self.seqs.pop(s, None)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.seqs.values())

"""Saved recurrent states of a hybrid model: the second half of its prefix cache.

A Qwen3.5 sequence is its attention KV blocks *and* the recurrent state of its linear-attention
layers after its last token. The state cannot be cut back to an earlier token, so a cached prefix
can only be continued where a copy of the state was saved. This keeps such copies in spare slots
of the workers' state pool, each one named by the digest of the KV block it ends (the block
manager's hash chain, ``blocks.py``): a new prompt resumes from the longest cached prefix that has
both its blocks and a saved state at its end.

The engine saves one at the last block boundary before every prompt's last token (the scheduler
ends a prompt chunk there), which is where the next turn of the same conversation resumes (an
agent resends the whole conversation each turn, and it grows at the end), and where a resend of the
same prompt or the other choices of an ``n > 1`` request resume.

Bounded: a fixed number of slots, the least recently used one is reused first, and a saved state
goes when the block it ends loses its name (evicted with the blocks, or the cache cleared).
"""

from __future__ import annotations

from collections import OrderedDict

from cortex.engine.blocks import Digest


class StateCheckpoints:
    def __init__(self, slots: list[int]) -> None:
        """``slots``: the workers' state-pool slots set aside for saved states."""
        self.capacity = len(slots)
        self.free: list[int] = list(slots)
        self.saved: OrderedDict[Digest, int] = OrderedDict()  # block digest -> slot, least recent first
        self.pinned: dict[int, int] = {}  # slot -> planned restores that read it

    def has(self, digest: Digest) -> bool:
        return digest in self.saved

    def take(self, digest: Digest) -> int:
        """The slot of ``digest``'s saved state, pinned until ``unpin``: a sequence restores from it."""
        slot = self.saved[digest]
        self.saved.move_to_end(digest)
        self.pinned[slot] = self.pinned.get(slot, 0) + 1
        return slot

    def unpin(self, slot: int) -> None:
        left = self.pinned.get(slot, 0) - 1
        if left > 0:
            self.pinned[slot] = left
            return
        self.pinned.pop(slot, None)
        if slot not in self.saved.values():  # dropped while a restore read it: free only now
            self.free.append(slot)

    def reserve(self) -> int | None:
        """A slot to save into: a free one, else the least recently used saved state that no planned
        restore reads; None when every slot is pinned."""
        if self.free:
            return self.free.pop()
        for digest, slot in self.saved.items():
            if slot not in self.pinned:
                del self.saved[digest]
                return slot
        return None

    def bind(self, slot: int, digest: Digest) -> None:
        """The reserved ``slot`` now holds the state at the end of block ``digest``."""
        if digest in self.saved:  # another sequence saved the same prefix first
            self.free.append(slot)
            return
        self.saved[digest] = slot

    def release(self, slot: int) -> None:
        """A reserved slot that was not filled (its step failed, or its block was not named)."""
        self.free.append(slot)

    def drop(self, digest: Digest) -> None:
        """The block ``digest`` lost its name: a state saved at its end can no longer be reached.
        (A slot a planned restore still reads is freed when the restore is done.)"""
        slot = self.saved.pop(digest, None)
        if slot is not None and slot not in self.pinned:
            self.free.append(slot)

    def clear(self) -> None:
        """Forget every saved state no planned restore reads."""
        for digest in [d for d, slot in self.saved.items() if slot not in self.pinned]:
            self.drop(digest)

"""KV block manager: which blocks of a model's pool each sequence holds, and the prefix cache.

A full block is named by the hash of its tokens and of everything before it (a hash chain), so two
prompts that share a prefix share its blocks. Blocks are reference-counted; a block nobody uses goes
back to the free list but keeps its contents and hash until it is handed out again, so a later
request (the next turn of a chat, the same system prompt) can still reuse it. The least recently
freed block is reused first.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refs = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.hash_of: dict[int, int] = {}  # block -> hash, for full blocks with known contents
        self.by_hash: dict[int, int] = {}  # hash -> block

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def used(self) -> int:
        return self.num_blocks - len(self.free)

    def chain(self, tokens: list[int], hashes: list[int] | None = None) -> list[int]:
        """Hashes of each full block of ``tokens``, extending ``hashes`` (those of its first blocks,
        already known) instead of starting over."""
        out = list(hashes or [])
        bs = self.block_size
        parent = out[-1] if out else 0
        for i in range(len(out), len(tokens) // bs):
            parent = hash((parent, tuple(tokens[i * bs : (i + 1) * bs])))
            out.append(parent)
        return out

    def allocate_prompt(self, tokens: list[int], reserve: int = 0) -> tuple[list[int], int] | None:
        """Blocks for a new sequence's ``tokens``, reusing cached full blocks of its prefix.

        Returns (block table, tokens already computed) or None when fewer than ``reserve`` blocks
        would stay free. The last token is always computed anew (its logits are needed), so its
        block is never a shared one.
        """
        bs = self.block_size
        hits = []
        for h in self.chain(tokens[: ((len(tokens) - 1) // bs) * bs]):
            b = self.by_hash.get(h)
            if b is None:
                break
            hits.append(b)
        fresh = -(-len(tokens) // bs) - len(hits)
        reusable_free = sum(1 for b in hits if self.refs[b] == 0)
        if self.num_free - reusable_free - fresh < reserve:
            return None
        for b in hits:
            self._take(b)
        table = hits + [self._take_fresh() for _ in range(fresh)]
        return table, len(hits) * bs

    def grow(self, table: list[int], positions: int) -> bool:
        """Extend ``table`` to cover ``positions``; False if the pool is exhausted."""
        need = -(-positions // self.block_size) - len(table)
        if need > self.num_free:
            return False
        table += [self._take_fresh() for _ in range(need)]
        return True

    def register(self, table: list[int], tokens: list[int], computed: int, hashes: list[int]) -> None:
        """Name the blocks that ``computed`` tokens have filled, so later prompts can reuse them.
        ``hashes`` is the sequence's chain so far; it is extended in place (each block hashed once)."""
        known = len(hashes)
        hashes[:] = self.chain(tokens[:computed], hashes)
        for i in range(known, len(hashes)):
            b, h = table[i], hashes[i]
            if b in self.hash_of:
                continue
            if h not in self.by_hash:
                self.by_hash[h] = b
                self.hash_of[b] = h

    def release(self, table: list[int]) -> None:
        # tail first: a prompt's later blocks are the least likely to be shared, so they go first
        for b in reversed(table):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free[b] = None
        table.clear()

    def _take(self, b: int) -> None:
        if self.refs[b] == 0:
            del self.free[b]
        self.refs[b] += 1

    def _take_fresh(self) -> int:
        b, _ = self.free.popitem(last=False)  # the least recently freed
        h = self.hash_of.pop(b, None)
        if h is not None and self.by_hash.get(h) == b:
            del self.by_hash[h]  # its old contents are about to be overwritten
        self.refs[b] = 1
        return b

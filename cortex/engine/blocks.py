"""KV block manager: which blocks of a model's pool each sequence holds, and the prefix cache.

A full block is named by a digest of its tokens and of everything before it (a hash chain), so two
prompts that share a prefix share its blocks. The digest is a cryptographic one (BLAKE2b, 128 bits)
over the parent's digest, the block's token ids and the pool's namespace (the model, and whatever
else changes what the KV holds); a prompt's first block hangs off its request's cache salt, so
requests with different salts (tenants that must not share a cache) never share a block. The digest
only finds a candidate: a hit is one whose tokens are the prompt's, whose salt is the request's and
whose parent is the block just matched, and a block's name goes when its parent is overwritten. So
another prompt's KV is never handed out, even if two digests were to collide.

Blocks are reference-counted; a block nobody uses goes back to the free list but keeps its contents
and name until it is handed out again, so a later request (the next turn of a chat, the same system
prompt) can still reuse it. The least recently freed block is reused first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

Digest = bytes


def salt_root(salt: bytes) -> Digest:
    """The parent a prompt's first block hangs off: nothing, or a digest of its cache salt."""
    return hashlib.blake2b(salt, digest_size=16, person=b"cortex-kv-salt").digest() if salt else b""


def block_digest(parent: Digest, tokens: list[int], namespace: bytes) -> Digest:
    """The name of a full block: its parent's name, its token ids and the pool's namespace."""
    h = hashlib.blake2b(parent, digest_size=16, person=b"cortex-kv-block")
    h.update(namespace)
    h.update(array("q", tokens).tobytes())
    return h.digest()


@dataclass(frozen=True)
class CachedBlock:
    """What a named block holds, checked on every hit: its tokens, after those of ``parent``."""

    digest: Digest
    parent: int | None  # the block holding the tokens before these; None for a prompt's first block
    tokens: tuple[int, ...]
    salt: bytes = b""  # the cache salt of the request that computed it


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        namespace: str = "",
        prefix_cache: bool = True,
        on_forget: Callable[[Digest], None] | None = None,
    ):
        """``prefix_cache`` False: no block is ever named or reused. ``on_forget``: told each name
        that goes (a hybrid model's saved states, ``checkpoints.py``, go with their blocks)."""
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_cache = prefix_cache
        self.on_forget = on_forget
        self.namespace = namespace.encode()
        self.refs = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cached: dict[int, CachedBlock] = {}  # block -> what it holds, for full blocks with known contents
        self.by_digest: dict[Digest, int] = {}  # digest -> block
        self.children: dict[int, set[int]] = {}  # block -> the cached blocks computed after it

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def used(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def num_cached(self) -> int:
        """Blocks whose contents are named in the prefix cache (in use or free)."""
        return len(self.cached)

    def chain(self, tokens: list[int], digests: list[Digest] | None = None, salt: bytes = b"") -> list[Digest]:
        """Digests of each full block of ``tokens``, extending ``digests`` (those of its first
        blocks, already known) instead of starting over."""
        out = list(digests or [])
        bs = self.block_size
        parent = out[-1] if out else salt_root(salt)
        for i in range(len(out), len(tokens) // bs):
            parent = block_digest(parent, tokens[i * bs : (i + 1) * bs], self.namespace)
            out.append(parent)
        return out

    def allocate_prompt(
        self,
        tokens: list[int],
        reserve: int = 0,
        salt: bytes = b"",
        resumable: Callable[[Digest], bool] | None = None,
    ) -> tuple[list[int], int] | None:
        """Blocks for a new sequence's ``tokens``, reusing cached full blocks of its prefix.

        Returns (block table, tokens already computed) or None when fewer than ``reserve`` blocks
        would stay free. The last token is always computed anew (its logits are needed), so its
        block is never a shared one. ``resumable``: whether the computation can continue after a
        block (a hybrid model's needs a saved state there); the hit is cut to the last such block.
        """
        hits = self._hits(tokens, salt) if self.prefix_cache else []
        while resumable is not None and hits and not resumable(self.cached[hits[-1]].digest):
            hits.pop()
        fresh = -(-len(tokens) // self.block_size) - len(hits)
        reusable_free = sum(1 for b in hits if self.refs[b] == 0)
        if self.num_free - reusable_free - fresh < reserve:
            return None
        for b in hits:
            self._take(b)
        table = hits + [self._take_fresh() for _ in range(fresh)]
        return table, len(hits) * self.block_size

    def _hits(self, tokens: list[int], salt: bytes) -> list[int]:
        """The cached blocks that hold ``tokens``' prefix, each one verified: its tokens are the
        prompt's, its salt the request's, and its parent is the block matched before it."""
        bs, hits = self.block_size, []
        for i, digest in enumerate(self.chain(tokens[: ((len(tokens) - 1) // bs) * bs], salt=salt)):
            b = self.by_digest.get(digest)
            held = self.cached.get(b) if b is not None else None
            parent = hits[-1] if hits else None
            if (
                held is None
                or held.parent != parent
                or held.salt != salt
                or held.tokens != tuple(tokens[i * bs : (i + 1) * bs])
            ):
                break
            hits.append(b)
        return hits

    def grow(self, table: list[int], positions: int) -> bool:
        """Extend ``table`` to cover ``positions``; False if the pool is exhausted."""
        need = -(-positions // self.block_size) - len(table)
        if need > self.num_free:
            return False
        table += [self._take_fresh() for _ in range(need)]
        return True

    def register(
        self, table: list[int], tokens: list[int], computed: int, digests: list[Digest], salt: bytes = b""
    ) -> None:
        """Name the blocks that ``computed`` tokens have filled, so later prompts can reuse them.
        ``digests`` is the sequence's chain so far; it is extended in place (each block hashed once)."""
        if not self.prefix_cache:
            return
        known, bs = len(digests), self.block_size
        digests[:] = self.chain(tokens[:computed], digests, salt)
        for i in range(known, len(digests)):
            b, digest = table[i], digests[i]
            # its parent is the block named for the tokens before it: this sequence's own, or the
            # copy another sequence computed at the same time (same tokens, same KV)
            parent = self.by_digest.get(digests[i - 1]) if i else None
            if b in self.cached or digest in self.by_digest:
                continue  # named already, or the same prefix is cached in other blocks
            if i and parent is None:
                continue  # a name is only reachable through its parent's
            self.cached[b] = CachedBlock(digest, parent, tuple(tokens[i * bs : (i + 1) * bs]), salt)
            self.by_digest[digest] = b
            if parent is not None:
                self.children.setdefault(parent, set()).add(b)

    def release(self, table: list[int]) -> None:
        # tail first: a prompt's later blocks are the least likely to be shared, so they go first
        for b in reversed(table):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free[b] = None
        table.clear()

    def forget_free(self) -> list[int]:
        """Drop the names of the cached blocks no sequence holds (and of blocks computed after
        them); return those blocks, whose contents may now be erased."""
        free = [b for b in self.cached if self.refs[b] == 0]
        for b in free:
            self._forget(b)
        return free

    def _forget(self, b: int) -> None:
        """``b`` is about to hold other tokens: it, and every block computed after it, lose their names."""
        stack = [b]
        while stack:
            held = self.cached.pop(block := stack.pop(), None)
            if held is None:
                continue
            if self.by_digest.get(held.digest) == block:
                del self.by_digest[held.digest]
                if self.on_forget is not None:
                    self.on_forget(held.digest)
            if held.parent is not None:
                self.children.get(held.parent, set()).discard(block)
            stack.extend(self.children.pop(block, ()))

    def _take(self, b: int) -> None:
        if self.refs[b] == 0:
            del self.free[b]
        self.refs[b] += 1

    def _take_fresh(self) -> int:
        b, _ = self.free.popitem(last=False)  # the least recently freed
        self._forget(b)  # its old contents are about to be overwritten
        self.refs[b] = 1
        return b

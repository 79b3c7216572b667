"""Continuous batching for one model: which tokens of which sequences go into the next step.

Every step takes, within a token budget: one token of every decoding sequence (oldest first), then
chunks of prompts being prefilled, then new sequences from the queue as long as their prompt's
blocks fit. A long prompt is split into chunks so it never stalls the decoding of others: at most
``prefill_chunk`` tokens, and, while other sequences decode, only as much as the model's step clock
predicts fits in ``step_target_s`` (``cortex/engine/step_clock.py``). When the
KV pool runs out, the newest sequence is preempted: its blocks are freed and it is recomputed later
(its output so far is kept; only its KV is rebuilt).

A hybrid model (Qwen3.5: linear-attention layers with a recurrent state per sequence) also needs a
state slot per running sequence: one is taken at admission (a sequence waits while none is free)
and given back when it finishes or is preempted; a sequence computing position 0 starts from a
zeroed slot. Its prefix cache needs a saved state where a cached prefix ends (``checkpoints.py``):
a prompt chunk ends at the prompt's last block boundary and the state there is saved into a spare
slot; a later prompt resumes from the longest cached prefix with a saved state at its end (the
state is copied into its slot before its first step). The other choices of an ``n > 1`` request
wait until the first has saved its prompt's state, then resume from it: the prompt is computed once.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

from cortex.engine.blocks import BlockManager
from cortex.engine.checkpoints import StateCheckpoints
from cortex.engine.sequence import Sequence
from cortex.engine.step_clock import PROBE_UNITS, StepClock, tokens_within, units


@dataclass
class Work:
    seq: Sequence
    tokens: list[int]
    start: int
    decode: bool = False  # the next token of a sequence that is generating (not a prompt chunk)
    restore_from: int = -1  # hybrid: copy this saved state into the sequence's slot first
    save_to: int = -1  # hybrid: save the sequence's state after this chunk into this slot
    follows: bool = False  # overlapped: its token is the one the step in flight before it samples
    steps: int = 1  # multi-step decode: forwards back to back, each sampling (``GenerateStep.steps``)

    @property
    def first(self) -> bool:
        """The sequence's first chunk since admission (the worker has not seen it yet)."""
        return self.start == self.seq.cached_tokens and not self.seq.computed_once

    @property
    def samples(self) -> bool:
        return self.follows or self.start + len(self.tokens) == len(self.seq.tokens)


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_batch_tokens: int,
        prefill_chunk: int,
        max_seqs: int,
        step_target_s: float = 0.0,
        attention_k: float = math.inf,
        state_slots: int = 0,
        checkpoints: int = 0,
    ):
        """``step_target_s``: while sequences decode, a step's prefill is sized to end within it (0:
        off). ``attention_k``: the model's ``attention_span_equivalent`` (how cost grows with context).
        ``state_slots``: recurrent state slots of a hybrid model for running sequences (0: a plain
        decoder, none needed); ``checkpoints``: more slots after those, for saved prefix states (0:
        a hybrid model then reuses no cached prefix)."""
        self.blocks = blocks
        self.max_batch_tokens, self.prefill_chunk, self.max_seqs = max_batch_tokens, prefill_chunk, max_seqs
        self.step_target_s, self.attention_k = step_target_s, attention_k
        self.clock = StepClock()
        self._allowance: float | None = None  # prefill units left in the step being planned; None: no cap
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.state_slots, self.recurrent = state_slots, state_slots > 0
        self.free_slots: list[int] = list(range(state_slots))
        self.checkpoints: StateCheckpoints | None = None
        if self.recurrent:
            blocks.prefix_cache = checkpoints > 0  # a cached prefix is only usable where a state was saved
        if self.recurrent and checkpoints:
            self.checkpoints = StateCheckpoints(list(range(state_slots, state_slots + checkpoints)))
            blocks.on_forget = self.checkpoints.drop

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Forget a sequence (finished, cancelled or failed) and free its blocks."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self._let_go(seq)

    def fits(self, prompt_len: int) -> bool:
        """Whether a prompt of this length could ever be held, with the whole pool to itself."""
        return -(-(prompt_len + 1) // self.blocks.block_size) <= self.blocks.num_blocks

    def plan(self, decode_steps: int = 1) -> list[Work]:
        """The next step. ``decode_steps``: when the step is every running sequence decoding and
        nothing waits, up to that many forwards back to back (``_multi_step``)."""
        budget = self.max_batch_tokens
        work: list[Work] = []
        for seq in list(self.running):  # decodes first: they are what users are watching
            if seq.pending != 1 or budget == 0 or seq not in self.running:
                continue
            if not self._grow(seq, seq.computed + 1, work):
                continue
            work.append(Work(seq, seq.tokens[-1:], seq.computed, decode=True))
            budget -= 1
        self._allowance = self._prefill_allowance(decoding=bool(work))
        for seq in self.running:  # then prompts being prefilled, a chunk each
            if seq.pending > 1 and budget > 0 and self._may_prefill():
                budget -= self._chunk(seq, budget, work)
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_seqs or not self._may_prefill():
                break
            if self._awaits_sibling(seq):
                continue  # it resumes from its first choice's saved prompt state, once there is one
            if self.recurrent and not self.free_slots:
                break  # every state slot is held: it waits, as for blocks
            # keep a block in hand for each running sequence, so admitting does not force preemption
            got = self.blocks.allocate_prompt(
                seq.tokens,
                reserve=len(self.running),
                salt=seq.cache_salt,
                resumable=self.checkpoints.has if self.checkpoints is not None else None,
            )
            if got is None:
                break
            self.waiting.remove(seq)
            seq.block_table, seq.computed = got
            if self.recurrent:
                self._give_state(seq)
            if not seq.admitted:
                seq.cached_tokens, seq.admitted = seq.computed, True
            self.running.append(seq)
            budget -= self._chunk(seq, budget, work)
        if decode_steps > 1 and all(w.seq.output_len for w in work):  # a first token goes out alone
            self._multi_step(work, [w.seq.max_tokens - w.seq.output_len for w in work], decode_steps)
        return work

    def plan_ahead(self, in_flight: list[Work], decode_steps: int = 1) -> list[Work]:
        """The decode step after the one in flight, planned before its tokens are known: each of
        its sequences feeds the token that step samples (``follows``; the worker has it). Only when
        that step is the whole batch and every sequence in it will surely want one more token
        (empty when not: the next step is then planned as usual, once the tokens are back). A
        sequence that stops on the token in flight wastes its overlapped position, nothing more."""
        if self.waiting or {w.seq.seq_id for w in in_flight} != {s.seq_id for s in self.running}:
            return []  # a newcomer, or a sequence outside the step, waits for a plan of its own
        work, left = [], []
        for w in in_flight:
            seq = w.seq
            after = seq.max_tokens - seq.output_len - w.steps  # what it may still make after the step in flight
            if not w.samples or seq.cancelled or seq.constraint is not None or after < 1:
                return []  # a grammar needs the token in flight before the next step's mask
            start = w.start + len(w.tokens) + w.steps - 1
            if not self.blocks.grow(seq.block_table, start + 1):
                return []  # no preemption for a step that may be wasted
            work.append(Work(seq, [0], start, decode=True, follows=True))
            left.append(after)
        if decode_steps > 1:
            self._multi_step(work, left, decode_steps)
        return work

    def _multi_step(self, work: list[Work], left: list[int], decode_steps: int) -> None:
        """Make a step of decodes several forwards (``GenerateStep.steps``): one message to the
        workers and one reply for up to ``decode_steps`` tokens of each sequence. Only when the step
        is the whole running batch decoding and nothing waits (a newcomer's prompt would wait for
        the forwards), no sequence follows a grammar or wants logprobs (the leader needs each token
        before the next mask; logprobs travel per token), and every one may make that many more
        tokens (``left``) and gets room for them without preempting anyone. The forwards together
        take about ``step_target_s`` at most, as the step clock predicts: a big batch's are few."""
        if self.waiting or not work or len(work) != len(self.running):
            return
        if not all(_multistep_ok(w) for w in work):
            return
        steps = min(decode_steps, *left)
        if self.step_target_s and self.clock.fixed_s:  # a newcomer waits for these forwards: keep them short
            steps = min(steps, int(self.step_target_s / self.clock.fixed_s))
        if steps < 2 or not all(self.blocks.grow(w.seq.block_table, w.start + steps) for w in work):
            return
        for w in work:
            w.steps = steps

    def _give_state(self, seq: Sequence) -> None:
        """A state slot for an admitted hybrid sequence: zeroed, or a saved prefix's state copied in;
        and where its prompt's state will be saved."""
        seq.state_slot = self.free_slots.pop(0)
        if self.checkpoints is None:
            return
        bs = self.blocks.block_size
        if seq.computed:
            seq.restore_slot = self.checkpoints.take(self.blocks.cached[seq.block_table[seq.computed // bs - 1]].digest)
        # the last block boundary before the prompt's last token (which is always computed anew):
        # where the next turn of its conversation, a resend of it, or its other choices resume
        boundary = ((seq.prompt_len - 1) // bs) * bs
        seq.checkpoint_at = boundary if boundary > seq.computed else 0

    def _awaits_sibling(self, seq: Sequence) -> bool:
        """Another choice of the same request is still computing the prompt state it will resume from."""
        if self.checkpoints is None or not seq.index:
            return False
        return any(s.request_id == seq.request_id and s.computed < s.checkpoint_at for s in self.running)

    def _prefill_allowance(self, decoding: bool) -> float | None:
        if not decoding or not self.step_target_s:
            return None  # nobody waits on this step, or no target: whole chunks
        allowance = self.clock.prefill_allowance(self.step_target_s)
        # at least a probe's worth: decodes alone may take longer than the target (a big batch on a
        # slow device), and new requests must still start rather than wait for every stream to end
        return PROBE_UNITS if allowance is None else max(allowance, PROBE_UNITS)

    def _may_prefill(self) -> bool:
        return self._allowance is None or self._allowance > 0

    def _chunk(self, seq: Sequence, budget: int, work: list[Work]) -> int:
        n = min(seq.pending, self.prefill_chunk, budget)
        if self._allowance is not None:
            n = min(n, tokens_within(self._allowance, seq.computed, self.attention_k))
        if seq.computed < seq.checkpoint_at < seq.computed + n:
            n = seq.checkpoint_at - seq.computed  # end the chunk where its state is saved
        if self._allowance is not None:
            self._allowance -= units(n, seq.computed, self.attention_k)
        chunk = Work(seq, seq.tokens[seq.computed : seq.computed + n], seq.computed, restore_from=seq.restore_slot)
        seq.restore_slot = -1  # copied by this step
        if self.checkpoints is not None and seq.computed + n == seq.checkpoint_at:
            slot = self.checkpoints.reserve()
            chunk.save_to = -1 if slot is None else slot
            if slot is None:
                seq.checkpoint_at = 0  # every saved state is in use: this prompt's is not kept
        work.append(chunk)
        return n

    def _grow(self, seq: Sequence, positions: int, work: list[Work]) -> bool:
        """Make room for ``seq``; preempt the newest other sequences if the pool is full."""
        while not self.blocks.grow(seq.block_table, positions):
            in_step = {w.seq.seq_id for w in work}
            victims = [s for s in reversed(self.running) if s is not seq and s.seq_id not in in_step]
            if not victims:
                return False
            self._preempt(victims[0])
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._let_go(seq)  # its state is lost: it restarts at position 0, from a zeroed slot
        seq.computed = 0
        seq.block_digests.clear()
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _let_go(self, seq: Sequence) -> None:
        """Free a sequence's blocks and state slot, its blocks named for the prefix cache first as
        far as its tokens are known (a multi-step's last forwards are named only here or at the
        next step's ``done``)."""
        self._name_blocks(seq)
        self.blocks.release(seq.block_table)
        self._free_slot(seq)

    def _name_blocks(self, seq: Sequence) -> None:
        self.blocks.register(seq.block_table, seq.tokens, seq.computed, seq.block_digests, seq.cache_salt)

    def _free_slot(self, seq: Sequence) -> None:
        if seq.state_slot >= 0:
            self.free_slots.append(seq.state_slot)
            seq.state_slot = -1
        if seq.restore_slot >= 0:  # admitted from a saved state, gone before its first step
            self.checkpoints.unpin(seq.restore_slot)
            seq.restore_slot = -1
        seq.checkpoint_at = 0

    def abandon(self, work: list[Work]) -> None:
        """A step that failed: what it was to restore and save is let go."""
        if self.checkpoints is None:
            return
        for w in work:
            if w.restore_from >= 0:
                self.checkpoints.unpin(w.restore_from)
            if w.save_to >= 0:
                self.checkpoints.release(w.save_to)

    def clear_prefix_cache(self) -> list[int]:
        """Forget every cached prefix no sequence holds (blocks and saved states); the freed blocks."""
        blocks = self.blocks.forget_free()
        if self.checkpoints is not None:
            self.checkpoints.clear()
        return blocks

    def done(self, work: list[Work], seconds: float | None = None, ran: int = 1) -> None:
        """Record a finished step (and how long it took): the fed tokens now have KV; name the
        blocks they filled. ``ran``: the forwards a multi-step ran (each fed one more token; the
        sequence's list gets them as its sampled tokens are applied, after this)."""
        if seconds is not None:
            prefill = sum(units(len(w.tokens), w.start, self.attention_k) for w in work if not w.decode)
            self.clock.observe(prefill, seconds / ran)  # the clock models one forward
        for w in work:
            w.seq.computed = w.start + len(w.tokens) + ran - 1
            w.seq.computed_once = True
            self._name_blocks(w.seq)
            if w.restore_from >= 0:
                self.checkpoints.unpin(w.restore_from)
            if w.save_to >= 0:
                self._saved(w)

    def _saved(self, w: Work) -> None:
        """The state at the end of ``w`` is in its reserved slot: name it by the block it ends, if
        that block's name is known (the prefix is cached), else give the slot back."""
        digest = w.seq.block_digests[w.seq.computed // self.blocks.block_size - 1]
        if digest in self.blocks.by_digest:
            self.checkpoints.bind(w.save_to, digest)
        else:
            self.checkpoints.release(w.save_to)


def _multistep_ok(w: Work) -> bool:
    """Whether a step's work may run several forwards (``Scheduler._multi_step``)."""
    seq = w.seq
    return w.decode and seq.constraint is None and seq.sampling.logprobs < 0

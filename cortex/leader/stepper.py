"""The stepper: the running requests of every loaded model, one batched step at a time.

It owns the per-model schedulers (created when a model loads, dropped when it goes), the table
of live sequences and the step in flight per model. Each loop turn it plans the next step of
every model that has work and none in flight, sends one ``GenerateStep`` to the model's ranks,
and applies the result: tokens to sequences, text and finish to the front, blocks back to the
pool. While a model decodes, its next step is sent before the running one's tokens return
(``[engine] overlap_steps``, ``Scheduler.plan_ahead``): the worker starts it the moment it
answers, and the leader's bookkeeping of one step overlaps the device's work on the next. A
failed step fails its requests here and asks the lifecycle to recover the model. A model's turn
may go to an embedding batch instead (``Embedder.plan``): the model then counts as
stepping until it returns.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from cortex.chat.tokenizer import token_bytes
from cortex.engine.blocks import BlockManager
from cortex.engine.calls import CallError, CallErrorKind, ignore
from cortex.engine.requests import RequestTable
from cortex.engine.scheduler import Scheduler, Work
from cortex.engine.sequence import Sequence
from cortex.engine.step_clock import attention_span_equivalent
from cortex.leader.shared import RETRY_AFTER_LOADING_S, Shared
from cortex.models.registry import ModelState, ModelStatus
from rpc.engine import Delta, FailureKind, Finished
from rpc.messages import KV_BLOCK_SIZE, ClearKvCache, GenerateStep, ReleaseSequences, SeqInput

if TYPE_CHECKING:
    from cortex.leader.embedding import Embedder
    from cortex.leader.lifecycle import ModelLifecycle
    from cortex.leader.limits import ClientLimits

log = logging.getLogger("cortex.leader")

EMBEDDING: list[Work] = []  # the in-flight "work" of a model whose turn an embedding batch holds


class Stepper:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.schedulers: dict[str, Scheduler] = {}  # model id -> its batcher, while loaded
        self.in_flight: dict[str, list[Work]] = {}  # model id -> the work of its step in flight
        self.ahead: dict[str, list[Work]] = {}  # model id -> an overlapped step sent behind it
        self.started: dict[str, float] = {}  # model id -> when its step in flight began on the device
        self.requests = RequestTable()  # live sequences (waiting or running)
        self.lifecycle: ModelLifecycle  # wired by Leader: recovers a model whose step failed
        self.embedder: Embedder  # wired by Leader: embedding batches take turns with steps
        self.limits: ClientLimits  # wired by Leader (admission's): generated tokens count per key

    # -- models come and go ---------------------------------------------------------------------------

    def start_model(self, state: ModelState, kv_blocks: int, state_slots: int = 0, checkpoints: int = 0) -> None:
        """``state_slots``: a hybrid model's recurrent state slots for running sequences, and
        ``checkpoints`` more after them for its prefix cache's saved states."""
        engine = self.shared.cfg.engine
        blocks = BlockManager(kv_blocks, KV_BLOCK_SIZE, namespace=state.id)
        self.schedulers[state.id] = Scheduler(
            blocks,
            engine.max_batch_tokens,
            engine.prefill_chunk,
            engine.max_seqs,
            step_target_s=engine.step_target_ms / 1000,
            attention_k=attention_span_equivalent(state.files.config),
            state_slots=state_slots,
            checkpoints=checkpoints,
        )

    def stop_model(self, model_id: str) -> None:
        self.schedulers.pop(model_id, None)
        self.end_embedding(model_id)
        message = f"model {model_id!r} was unloaded"
        self.embedder.fail_model(model_id, FailureKind.WORKER_FAILED, message, RETRY_AFTER_LOADING_S)

    def busy(self, state: ModelState) -> int:
        """Requests in flight, queued or waiting for it (a model with any is never evicted)."""
        live = len(self.requests.of_model(state.id)) + self.embedder.count(state.id)
        return live + len(state.parked) + len(state.waiters)

    def stepping(self, model_id: str) -> bool:
        return model_id in self.in_flight

    def in_step(self, seq: Sequence) -> bool:
        steps = (self.in_flight.get(seq.model_id, ()), self.ahead.get(seq.model_id, ()))
        return any(w.seq is seq for step in steps for w in step)

    def add(self, seq: Sequence) -> None:
        """An admitted sequence joins its model's queue."""
        self.requests.add(seq)
        self.schedulers[seq.model_id].add(seq)

    # -- steps ------------------------------------------------------------------------------------------

    def schedule(self) -> None:
        """Start the next step of every loaded model that has work and no step in flight."""
        for model_id, sched in list(self.schedulers.items()):  # a failed send may stop a model
            if model_id in self.in_flight:
                self._overlap(model_id, sched)
                continue
            state = self.shared.registry.models[model_id]
            if state.status != ModelStatus.LOADED:
                continue
            batch = self.embedder.plan(state, sched.has_work())
            if batch:
                self.in_flight[model_id] = EMBEDDING  # no step goes to its ranks until the batch returns
                self.embedder.send(state, batch)
                continue
            if not sched.has_work():
                continue
            work = sched.plan(self._decode_steps(model_id))
            if work:
                self._step(state, work)
                self._overlap(model_id, sched)

    def _overlap(self, model_id: str, sched: Scheduler) -> None:
        """Send the step after the one in flight now, if the batch is decoding steadily."""
        running = self.in_flight[model_id]
        state = self.shared.registry.models[model_id]
        if (
            model_id in self.ahead
            or running is EMBEDDING
            or not self.shared.cfg.engine.overlap_steps
            or state.status != ModelStatus.LOADED
            or self.embedder.count(model_id)
        ):
            return
        work = sched.plan_ahead(running, self._decode_steps(model_id))
        if work:
            self._step(state, work)

    def _decode_steps(self, model_id: str) -> int:
        """Forwards a step of decodes may run: one while an embedding batch waits for the model."""
        return 1 if self.embedder.count(model_id) else self.shared.cfg.engine.decode_steps

    def _step(self, state: ModelState, work: list[Work]) -> None:
        """Send a step: the model's step in flight, or the overlapped one behind it."""
        step = GenerateStep(state.id, [_seq_input(w) for w in work], work[0].steps)
        overlapped = state.id in self.in_flight
        if overlapped:
            self.ahead[state.id] = work
        else:
            self.in_flight[state.id], self.started[state.id] = work, time.monotonic()
        self.shared.stats.step_started(state.id, work, overlapped)
        gen = state.load_gen

        def done(replies: dict, error: CallError | None) -> None:
            if self.in_flight.get(state.id) is not work:
                return  # dropped behind a step that failed, whose requests were failed with it
            seconds = time.monotonic() - self.started[state.id]
            del self.in_flight[state.id]
            behind = self.ahead.pop(state.id, None)
            if behind is not None and error is None:  # the worker started it as it answered
                self.in_flight[state.id], self.started[state.id] = behind, time.monotonic()
            if gen != state.load_gen:
                return  # the model was torn down meanwhile; its requests were already failed
            if error:
                self._step_failed(state, work, error)
            else:
                self._apply(state, work, replies[state.ranks[0]], seconds)

        self.shared.calls.call(state.ranks, lambda _: step, self.shared.cfg.engine.step_timeout_s, done)

    def end_embedding(self, model_id: str) -> None:
        """The model's embedding batch returned (or its model went): its turn is over."""
        if self.in_flight.get(model_id) is EMBEDDING:
            del self.in_flight[model_id]

    def _step_failed(self, state: ModelState, work: list[Work], error: CallError) -> None:
        if state.id in self.schedulers:
            self.schedulers[state.id].abandon(work)
        for w in work:
            self.fail(w.seq, FailureKind.WORKER_FAILED, f"generation failed: {error.message}", RETRY_AFTER_LOADING_S)
        if error.kind == CallErrorKind.TIMEOUT:
            self.lifecycle.kill_group(state, f"a step took longer than {self.shared.cfg.engine.step_timeout_s:g}s")
        elif len(state.ranks) > 1 or error.kind == CallErrorKind.DIED:
            self.lifecycle.recover(state, f"a step failed: {error.message}")  # ranks may disagree now

    def _apply(self, state: ModelState, work: list[Work], result, seconds: float) -> None:
        n = len(work)
        logprobs, errors, more = result.logprobs or [None] * n, result.errors or [""] * n, result.more or [[]] * n
        rows = [r for r in zip(work, result.tokens, logprobs, errors, more, strict=True) if r[0].seq in self.requests]
        ran = 1 + len(more[0]) if result.more else 1
        self.schedulers[state.id].done([r[0] for r in rows], seconds, ran)  # an overlapped sequence may have ended
        for w, token, lp, err, later in rows:
            if w.seq not in self.requests:
                continue  # failed with a sibling choice earlier in this loop: its client has the Failure
            if w.seq.cancelled:
                self.retire(w.seq)
                continue
            tokens = [token, *later]
            if -1 in tokens:  # its sampling failed there: what came before it still counts
                tokens = tokens[: tokens.index(-1)]
            if w.samples and tokens:
                self._on_tokens(w.seq, tokens, lp)
            if err:
                self._fail_sampling(state, w.seq, err)

    def _on_tokens(self, seq: Sequence, tokens: list[int], logprobs: list | None = None) -> None:
        """Apply a step's sampled tokens (several from a multi-step) and send what they make: one
        Delta for them all, and the Finished if one ends the sequence (the rest are dropped)."""
        texts, finish = [], None
        for token in tokens:
            if seq.constraint is not None:
                tok = self.shared.registry.models[seq.model_id].files.tokenizer.tokenizer
                seq.constraint.advance(token, token_bytes(tok, token))
            text, finish = seq.append(token)
            texts.append(text)
            if finish:
                break
        self.shared.stats.tokens(seq, len(texts))
        entry = self._logprob_entry(seq, token, logprobs) if logprobs is not None else None
        if entry is not None and (finish != "stop" or token not in seq.eos_ids):
            seq.pending_logprobs.append(entry)
        text = "".join(texts)
        if text or seq.pending_logprobs:
            delta = Delta(
                seq.request_id,
                text,
                seq.output_len,
                seq.pending_logprobs or None,
                seq.index,
                seq.cached_tokens,
                [len(t) for t in texts] if len(texts) > 1 else None,
            )
            self.shared.reply(seq.peer, delta)
            seq.pending_logprobs = []
        if finish:
            self.shared.reply(
                seq.peer,
                Finished(
                    seq.request_id,
                    finish,
                    seq.prompt_len,
                    seq.output_len,
                    seq.cached_tokens,
                    seq.index,
                    seq.decoder.matched,
                ),
            )
            self.retire(seq)

    def _logprob_entry(self, seq: Sequence, token: int, logprobs: list) -> dict:
        tok = self.shared.registry.models[seq.model_id].files.tokenizer.tokenizer

        def one(tid: int, lp: float) -> dict:
            raw = token_bytes(tok, tid)
            return {"token": raw.decode(errors="replace"), "logprob": lp, "bytes": list(raw)}

        chosen, top = logprobs
        return {**one(token, chosen), "top_logprobs": [one(t, lp) for t, lp in top]}

    # -- endings ----------------------------------------------------------------------------------------

    def retire(self, seq: Sequence) -> None:
        """Forget a sequence: its blocks go back to the pool (kept for the prefix cache), and the
        workers drop its sampling state."""
        if self.requests.remove(seq):
            self.shared.stats.sequence_ended(seq, "cancelled" if seq.cancelled else "finished")
            self.limits.charge(seq.client, seq.output_len)
        sched = self.schedulers.get(seq.model_id)
        if sched is not None:
            sched.remove(seq)
        state = self.shared.registry.models[seq.model_id]
        self.shared.registry.touch(state)  # recency counts from a request's end too: long streams stay warm
        if state.status == ModelStatus.LOADED and seq.admitted:
            release = ReleaseSequences(state.id, [seq.seq_id])
            self.shared.calls.call(state.ranks, lambda _: release, 30.0, ignore)

    def cancel(self, request_id: str) -> None:
        """The client went away: its sequences stop (retired now, or when their step returns)."""
        choices = self.requests.choices(request_id)
        if choices:
            self.shared.stats.cancelled(choices[0].model_id, _stage(choices[0]))
        for seq in choices:
            seq.cancelled = True
            if not self.in_step(seq):
                self.retire(seq)  # else retired when its step returns: the worker is writing its blocks

    def fail(self, seq: Sequence, kind: FailureKind, message: str, retry_after: int | None = None) -> None:
        """Fail the request ``seq`` belongs to: one Failure, and its other choices stop too."""
        if seq not in self.requests:
            return  # already failed with a sibling choice
        self.shared.refuse(seq.peer, seq.request_id, kind, message, retry_after)
        for s in [seq, *[c for c in self.requests.choices(seq.request_id) if c is not seq]]:
            if self.requests.remove(s):
                self.shared.stats.sequence_ended(s, "failed")
                self.limits.charge(s.client, s.output_len)
            sched = self.schedulers.get(s.model_id)
            if sched is not None:
                sched.remove(s)

    def fail_request(self, request_id: str, kind: FailureKind, message: str) -> bool:
        """Fail a live request by id; False when no sequence of it is live."""
        seq = self.requests.first(request_id)
        if seq is None:
            return False
        self.fail(seq, kind, message)
        return True

    def _fail_sampling(self, state: ModelState, seq: Sequence, error: str) -> None:
        """A worker could not sample seq's token: its request fails (500) while the model and the
        step's other sequences go on, and the workers drop the sampling state of its choices."""
        if seq not in self.requests:
            return  # a sibling choice failed in the same step
        release = ReleaseSequences(state.id, [c.seq_id for c in self.requests.choices(seq.request_id)])
        self.fail(seq, FailureKind.INTERNAL, f"sampling failed: {error}")
        self.shared.calls.call(state.ranks, lambda _: release, 30.0, ignore)

    def fail_model(
        self, state: ModelState, kind: FailureKind, message: str, retry_after: int | None = RETRY_AFTER_LOADING_S
    ) -> None:
        """Every live request of the model fails (its load failed, or its group is being recovered)."""
        for seq in self.requests.of_model(state.id):
            self.fail(seq, kind, message, retry_after)
        self.embedder.fail_model(state.id, kind, message, retry_after)
        self.in_flight.pop(state.id, None)
        self.ahead.pop(state.id, None)

    def clear_prefix_cache(self, state: ModelState) -> str | None:
        """Drop every cached prompt of a loaded model that no request holds: their names go, and
        the workers zero their blocks. Why it cannot be done, if so."""
        sched = self.schedulers.get(state.id)
        if state.status != ModelStatus.LOADED or sched is None:
            return f"model '{state.id}' is {state.status}, not loaded"
        blocks = sched.clear_prefix_cache()
        log.info("prefix cache of %s cleared by an operator: %d block(s) zeroed", state.id, len(blocks))
        if blocks:
            clear = ClearKvCache(state.id, blocks)
            self.shared.calls.call(state.ranks, lambda _: clear, 30.0, ignore)
        return None

    def fail_all(self, kind: FailureKind, message: str, retry_after: int | None = None) -> None:
        for seq in list(self.requests):
            self.fail(seq, kind, message, retry_after)
        self.embedder.fail_all(kind, message, retry_after)


def _seq_input(w: Work) -> SeqInput:
    seq = w.seq
    return SeqInput(
        seq.seq_id,
        w.tokens,
        w.start,
        seq.sampling,
        list(seq.block_table),
        w.samples,
        prompt=seq.tokens[: seq.prompt_len] if w.first and seq.sampling.needs_history else None,
        allowed=seq.constraint.mask() if w.samples and seq.constraint else None,
        state_slot=seq.state_slot,
        state_from=w.restore_from,
        state_save=w.save_to,
        follows=w.follows,
        stop_ids=sorted(seq.eos_ids) if w.steps > 1 else None,
    )


def _stage(seq: Sequence) -> str:
    """Where a cancelled request was: queued, prefilling its prompt, or decoding."""
    if seq.output_len:
        return "decode"
    return "queue" if seq.admitted_at is None else "prefill"

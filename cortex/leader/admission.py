"""Admission: a front's ``Submit`` becomes queued sequences, or a clear refusal.

The path of one request: routed to a peer (when the model is not served here), parked while its
model loads, prepared off the loop (chat template, tokenization, grammar: ``Preparer``), then
checked against the context, the per-request and per-client limits and the queue, and queued as
``n`` sequences on its model's scheduler. It owns what a request needs before it runs: the
preparation threads, each model's grammar compiler, and the drain flag that refuses new work.
Cancellation of a request that has not started is handled here too. An ``Embed`` takes the same
way up to its preparation (tokenized inputs: ``embed_inputs``), then goes to the embedder.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cortex.chat.detokenizer import IncrementalDecoder
from cortex.chat.prompt import opens_in_reasoning
from cortex.engine.constraint import Grammars, Rules
from cortex.engine.prepare import Prepared, Preparer, Refused, prepare
from cortex.engine.scheduler import Scheduler
from cortex.engine.sequence import Sequence
from cortex.leader.embedding import embed_inputs
from cortex.leader.lifecycle import ModelLifecycle
from cortex.leader.limits import ClientLimits
from cortex.leader.shared import (
    RETRY_AFTER_DRAINING_S,
    RETRY_AFTER_LOADING_S,
    RETRY_AFTER_SHUTDOWN_S,
    Shared,
)
from cortex.leader.stepper import Stepper
from cortex.models import source
from cortex.models.registry import ModelState, ModelStatus
from rpc.codec import replace
from rpc.engine import Answer, ContextOverflow, Embed, FailureKind, Started, Submit, Waiting, context_message

if TYPE_CHECKING:
    from cortex.leader.embedding import Embedder

log = logging.getLogger("cortex.leader")

Router = Callable[["Submit | Embed", "ModelState | None"], object | None]


class Admission:
    def __init__(self, shared: Shared, lifecycle: ModelLifecycle, stepper: Stepper, route: Router) -> None:
        self.shared = shared
        self.lifecycle = lifecycle
        self.stepper = stepper
        self.route = route  # the fleet's answer for a request another node serves (or none can), else None
        self.preparer = Preparer()  # prompts and grammars of new requests, off the loop
        self.grammars: dict[str, Grammars] = {}  # model id -> its grammar compiler (built on first use)
        self.draining = False  # refuse new requests; in-flight ones finish (cortex-admin drain, SIGTERM)
        self.limits = ClientLimits(shared.cfg)  # per-key concurrency and tokens per minute (429)
        self.embedder: Embedder  # wired by Leader: embedding requests go there once tokenized

    # -- arrival ------------------------------------------------------------------------------------------

    def submit(self, peer: bytes, req: Submit | Embed) -> None:
        """Route, park or refuse the request, or hand it to a preparation thread."""
        rid, shared = req.request_id, self.shared
        if shared.stopping.is_set():
            return shared.refuse(
                peer, rid, FailureKind.SHUTTING_DOWN, "the server is shutting down", RETRY_AFTER_SHUTDOWN_S
            )
        state = shared.registry.resolve(req.model)
        answer = self.route(req, state)
        if answer is not None:  # another node serves it, or no node can
            return shared.reply(peer, answer)
        if self.draining:
            name = shared.cfg.node.name
            return shared.refuse(peer, rid, FailureKind.DRAINING, f"node {name} is draining", RETRY_AFTER_DRAINING_S)
        if state is None:
            return shared.refuse(peer, rid, FailureKind.MODEL_NOT_FOUND, f"The model '{req.model}' does not exist")
        wrong_task = _wrong_task(req, state)
        if wrong_task is not None:  # before any load: a model is never loaded for a request it cannot serve
            return shared.refuse(peer, rid, FailureKind.INVALID_REQUEST, wrong_task)
        if state.status != ModelStatus.LOADED:
            return self._park(peer, req, state)
        if isinstance(req, Embed):
            return self._prepare_embedding(peer, req, state)
        rules = Rules(
            json_schema=req.json_schema,
            tools=[t for t in req.tools or () if req.tool_name in (None, t["name"])] or None,
            tool_mode=req.tool_choice if req.tools else "none",
            parallel=req.parallel_tool_calls,
        )
        if req.tool_name is not None and not rules.tools:
            message = f"tool_choice names {req.tool_name!r}, not among the tools"
            return shared.refuse(peer, rid, FailureKind.INVALID_REQUEST, message)
        if self.stepper.requests.has_request(rid) or rid in self.preparer:
            return shared.refuse(peer, rid, FailureKind.INVALID_REQUEST, f"request id {rid!r} is already in use")
        files, grammars = state.files, self.grammars_of(state)
        self.preparer.submit(rid, (peer, req, state.id), lambda: prepare(files, req, rules, grammars))

    def _prepare_embedding(self, peer: bytes, req: Embed, state: ModelState) -> None:
        rid = req.request_id
        if rid in self.embedder or self.stepper.requests.has_request(rid) or rid in self.preparer:
            return self.shared.refuse(peer, rid, FailureKind.INVALID_REQUEST, f"request id {rid!r} is already in use")
        files = state.files
        self.preparer.submit(rid, (peer, req, state.id), lambda: embed_inputs(files, req))

    def submit_safely(self, peer: bytes, req: Submit | Embed) -> None:
        """One request's bug must never take the loop (and every other request) down."""
        try:
            self.submit(peer, req)
        except Exception as exc:
            log.exception("handling Submit failed")
            self.fail_internal(peer, req.request_id, exc)

    def fail_internal(self, peer: bytes, request_id: str, exc: Exception) -> None:
        message = f"internal error: {type(exc).__name__}"
        if not self.stepper.fail_request(request_id, FailureKind.INTERNAL, message):
            self.shared.refuse(peer, request_id, FailureKind.INTERNAL, message)

    def _park(self, peer: bytes, req: Submit | Embed, state: ModelState) -> None:
        """The model is not loaded: the request waits for its load (started now if need be)."""
        rid = req.request_id
        if state.status == ModelStatus.FAILED:
            return self.shared.refuse(
                peer, rid, FailureKind.MODEL_FAILED, f"model '{state.id}' failed to load: {state.error}"
            )
        if len(state.parked) >= self.shared.cfg.engine.max_waiting:
            message = (
                f"model '{state.id}' is {state.status} and {len(state.parked)} requests wait for it; retry shortly"
            )
            return self.shared.refuse(peer, rid, FailureKind.MODEL_LOADING, message, RETRY_AFTER_LOADING_S)
        # the front keeps the client's connection alive meanwhile (pings)
        state.parked.append((peer, req))
        self.shared.reply(peer, Waiting(rid, f"model '{state.id}' is {state.status}"))
        if state.status == ModelStatus.UNLOADED:
            self.lifecycle.load(state)  # may answer the parked request at once (no room for it)

    def admit_parked(self, state: ModelState) -> None:
        """The model is loaded: the requests that waited for it start now, in arrival order."""
        parked, state.parked = state.parked, []
        for peer, req in parked:
            self.submit_safely(peer, req)

    # -- prepared -----------------------------------------------------------------------------------------

    def take_prepared(self) -> None:
        """Admit the requests whose prompt and grammar are ready (one failure fails one request)."""
        for rid, (peer, req, model_id), result in self.preparer.finished():
            try:
                if isinstance(result, BaseException):
                    raise result
                self._admit(peer, req, model_id, result)
            except Exception as exc:
                log.exception("admitting request %s failed", rid)
                self.fail_internal(peer, rid, exc)

    def _admit(
        self, peer: bytes, req: Submit | Embed, model_id: str, prepared: Prepared | Refused | list[list[int]]
    ) -> None:
        """A prepared request joins its model's queue, or is refused (context, limits, queue)."""
        rid = req.request_id
        state = self.shared.registry.models.get(model_id)
        sched = self.stepper.schedulers.get(model_id)
        if state is None or state.status != ModelStatus.LOADED or sched is None:
            return self.submit(peer, req)  # the model went away meanwhile: park, route or fail it anew
        if isinstance(prepared, Refused):
            return self.shared.refuse(peer, rid, prepared.kind, prepared.message)
        if isinstance(req, Embed):
            return self.embedder.admit(peer, req, state, prepared)
        prompt = prepared.prompt
        if req.count_only:
            return self.shared.reply(peer, Answer(data={"input_tokens": len(prompt)}))
        refusal = self._limits(req, state, sched, len(prompt))
        if refusal is not None:
            return self.shared.refuse(peer, rid, *refusal)
        room, out_limit, files = state.context_length - len(prompt), state.entry.max_output_tokens, state.files
        eos = frozenset(req.stop_token_ids or ()) | (frozenset() if req.ignore_eos else frozenset(eos_ids(files)))
        self.limits.charge(req.client, len(prompt))  # generated tokens: when each choice ends (stepper)
        self.shared.registry.touch(state)
        for i in range(req.n):  # n choices: n sequences; seeded ones get seed + i so they differ
            sampling = req.sampling
            if i and sampling.seed is not None:
                sampling = replace(sampling, seed=sampling.seed + i)
            seq = Sequence(
                request_id=rid,
                peer=peer,
                model_id=state.id,
                prompt_len=len(prompt),
                tokens=list(prompt),
                sampling=sampling,
                max_tokens=req.max_tokens or min(room, out_limit or room),
                decoder=IncrementalDecoder(files.tokenizer.tokenizer, req.stop),
                eos_ids=eos,
                client=req.client,
                index=i,
                constraint=prepared.constraints[i],
                cache_salt=(req.cache_salt or "").encode(),
            )
            self.stepper.add(seq)
        reasoning = prepared.prompt_text is not None and opens_in_reasoning(prepared.prompt_text)
        self.shared.reply(peer, Started(rid, len(prompt), reasoning))

    def _limits(self, req: Submit, state: ModelState, sched: Scheduler, prompt_len: int) -> tuple | None:
        """(kind, message[, retry_after[, overflow]]) when the request exceeds the context or a limit; else None."""
        ctx = state.context_length
        if prompt_len >= ctx or (req.max_tokens is not None and req.max_tokens > ctx - prompt_len):
            # the numbers travel as fields: each dialect words them (cortex/api/errors.py)
            over = ContextOverflow(ctx, prompt_len, None if prompt_len >= ctx else req.max_tokens)
            return (FailureKind.CONTEXT_LENGTH_EXCEEDED, context_message(over), None, over)
        out_limit = state.entry.max_output_tokens
        if out_limit and req.max_tokens is not None and req.max_tokens > out_limit:
            return (
                FailureKind.INVALID_REQUEST,
                f"max_tokens is {req.max_tokens}; model '{state.id}' generates at most {out_limit} tokens per request",
            )
        engine = self.shared.cfg.engine
        limited = self.limits.refusal(req.client, self.held(req.client))
        if limited is not None:
            return (FailureKind.RATE_LIMITED, *limited)
        if len(sched.waiting) >= engine.max_waiting:
            message = f"model '{state.id}' has {len(sched.waiting)} requests waiting; retry shortly"
            return (FailureKind.OVERLOADED, message, retry_after(sched))
        return None

    # -- grammars -------------------------------------------------------------------------------------------

    def grammars_of(self, state: ModelState) -> Grammars:
        grammars = self.grammars.get(state.id)
        if grammars is None:
            tok = state.files.tokenizer
            grammars = Grammars(
                tok.tokenizer,
                state.files.config.vocab_size,
                sorted(eos_ids(state.files)),
                state.files.template.call_format,  # the model's own tool-call form (JSON or XML)
            )
            self.grammars[state.id] = grammars
        return grammars

    def warm_up(self, state: ModelState) -> None:
        """The grammar compiler reads the whole vocabulary (holding the GIL): once, on a preparation
        thread right after the load, not in the middle of streams when the first JSON request comes."""
        grammars = self.grammars_of(state)
        self.preparer.run(lambda: grammars.tokenizer)

    # -- cancellation and deadlines ------------------------------------------------------------------------

    def cancel(self, request_id: str) -> None:
        if self.preparer.discard(request_id) is not None:
            return  # gone before its prompt was ready: nothing was queued
        for state in self.shared.registry.models.values():
            before = len(state.parked)
            state.parked = [(p, r) for p, r in state.parked if r.request_id != request_id]
            if len(state.parked) < before:
                self.shared.stats.cancelled(state.id, "load")
                self.lifecycle.drop_unwanted_load(state)
        self.stepper.cancel(request_id)
        self.embedder.cancel(request_id)

    def check_queue_deadlines(self) -> None:
        limit = self.shared.cfg.engine.queue_timeout_s
        now = time.monotonic()
        for sched in self.stepper.schedulers.values():
            for seq in [s for s in sched.waiting if not s.admitted and now - s.arrived > limit]:
                message = f"waited {limit:g}s in the queue without starting; retry later"
                self.stepper.fail(seq, FailureKind.OVERLOADED, message, retry_after(sched))

    def held(self, client: str) -> int:
        """Requests ``client`` has in flight: generations and embeddings."""
        if not client:
            return 0
        return self.stepper.requests.requests_of(client) + self.embedder.per_client[client]

    def in_flight(self) -> int:
        """Requests this node still owes an answer: preparing, parked on a load, queued or running."""
        parked = sum(len(s.parked) for s in self.shared.registry.models.values())
        return self.stepper.requests.request_count + self.embedder.count() + len(self.preparer) + parked

    def shutdown(self) -> None:
        """Every request not yet answered gets a clear 503 (queued and running ones: the stepper)."""
        message, retry = "the server is shutting down", RETRY_AFTER_SHUTDOWN_S
        self.stepper.fail_all(FailureKind.SHUTTING_DOWN, message, retry)
        for state in self.shared.registry.models.values():
            parked, state.parked = state.parked, []
            for peer, req in parked:
                self.shared.refuse(peer, req.request_id, FailureKind.SHUTTING_DOWN, message, retry)
        for peer, req, _ in self.preparer.abandon():
            self.shared.refuse(peer, req.request_id, FailureKind.SHUTTING_DOWN, message, retry)


def eos_ids(files: source.ModelFiles) -> set[int]:
    """The model's end-of-sequence token ids: its config's, and its tokenizer's own EOS token."""
    eos = set(files.config.eos_token_ids)
    if files.tokenizer.eos_token is not None:
        eos_id = files.tokenizer.tokenizer.token_to_id(files.tokenizer.eos_token)
        if eos_id is not None:
            eos.add(eos_id)
    return eos


def retry_after(sched: Scheduler) -> int:
    """Seconds a refused client should wait: roughly how many rounds of the running batch the queue is."""
    return max(1, min(60, len(sched.waiting) // max(len(sched.running), 1)))


def _wrong_task(req: Submit | Embed, state: ModelState) -> str | None:
    """Why the model's catalogue ``task`` rules the request out, or None."""
    task = state.entry.task
    if isinstance(req, Embed) and task != "embed":
        return f"The model '{state.id}' does not serve embeddings: its task is '{task}' (models.toml)."
    if isinstance(req, Submit) and task == "embed":
        return (
            f"The model '{state.id}' serves embeddings only (its task is '{task}' in models.toml): use /v1/embeddings."
        )
    return None

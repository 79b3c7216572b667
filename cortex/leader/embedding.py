"""Embeddings: a front's ``Embed`` becomes batches of ``EmbedStep`` between the model's steps.

Admission routes, parks and prepares an ``Embed`` as it does a ``Submit`` (its inputs are
tokenized on a preparation thread by ``embed_inputs``: no chat template); then this room checks it
(context, dimensions, limits) and queues its inputs on the model. An embedding batch takes the
model's turn in the stepper: while it runs no ``GenerateStep`` is sent to the model, so no step
waits behind it on a worker's socket (its watchdog would count that wait), and when both have work
they alternate, so neither starves the other. A batch holds whole inputs, from one or more
requests, up to ``max_batch_tokens`` (a longer input goes alone; the worker runs it in pieces of
that size). The worker computes with KV scratch of its own: the model's pool, and the sequences in
it, are untouched. Pooling is the last token's state after the final norm (the convention of
decoder embedding models such as Qwen3-Embedding), L2-normalised on the worker.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cortex.engine.calls import CallError, CallErrorKind
from cortex.engine.prepare import Refused
from cortex.leader.shared import RETRY_AFTER_LOADING_S, Shared
from cortex.models import source
from cortex.models.registry import ModelState
from rpc.engine import Answer, Delta, Embed, FailureKind, Started
from rpc.messages import Embeddings, EmbedStep

if TYPE_CHECKING:
    from cortex.leader.admission import Admission
    from cortex.leader.lifecycle import ModelLifecycle
    from cortex.leader.stepper import Stepper

log = logging.getLogger("cortex.leader")

# architectures whose forward embeds with KV scratch alone (a hybrid with recurrent layers would
# need scratch recurrent state too: not yet)
EMBEDDING_ARCHS = frozenset({"llama", "qwen3"})


@dataclass(eq=False)
class EmbedJob:
    """One ``Embed`` request admitted on a loaded model: its inputs and the vectors done so far."""

    peer: bytes
    request_id: str
    model_id: str
    client: str
    inputs: list[list[int]]
    vectors: list[bytes | None] = field(default_factory=list)
    left: int = 0  # inputs not embedded yet
    over: bool = False  # answered, failed or cancelled: its queued inputs are skipped

    def __post_init__(self) -> None:
        self.vectors = [None] * len(self.inputs)
        self.left = len(self.inputs)

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.inputs)


def embed_inputs(files: source.ModelFiles, req: Embed) -> list[list[int]] | Refused:
    """Each input's token ids (runs on a preparation thread): text through the model's tokenizer
    as a whole input (no chat template; its post-processor's tokens, such as the EOS that
    Qwen3-Embedding pools on), ids as given, checked against its vocabulary. Field paths name the
    input."""
    vocab = files.tokenizer.vocab_size
    if req.input_ids is not None:
        for i, ids in enumerate(req.input_ids):
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                return _refused(req, i, f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
            if not ids:
                return _refused(req, i, "holds no token")
        return [list(ids) for ids in req.input_ids]
    out = []
    for i, text in enumerate(req.inputs or ()):
        ids = files.tokenizer.encode(text, whole=True)
        if not text or not ids:
            return _refused(req, i, "is empty: send at least one token of text")
        out.append(ids)
    return out or Refused(FailureKind.INVALID_REQUEST, "'input' holds no input")


def _refused(req: Embed, i: int, why: str) -> Refused:
    return Refused(FailureKind.INVALID_REQUEST, f"'{_where(req, i)}' {why}.")


def _where(req: Embed, i: int) -> str:
    """How the client named input ``i``: a single string or id array is ``input`` itself."""
    ids = req.input_ids
    single = (ids is not None and len(ids) == 1) or (req.inputs is not None and len(req.inputs) == 1)
    return "input" if single else f"input[{i}]"


class Embedder:
    def __init__(self, shared: Shared, stepper: Stepper) -> None:
        self.shared = shared
        self.stepper = stepper
        self.lifecycle: ModelLifecycle  # wired by Leader: recovers a model whose batch failed
        self.admission: Admission  # wired by Leader: per-client limits and in-flight counts
        self.jobs: dict[str, EmbedJob] = {}  # request id -> its job, until answered
        self.queues: dict[str, deque[tuple[EmbedJob, int]]] = {}  # model id -> (job, input) to embed
        self.per_model: Counter[str] = Counter()  # live jobs per model
        self.per_client: Counter[str] = Counter()  # live jobs per client
        self.took_last: set[str] = set()  # models whose last turn was an embedding batch

    # -- admission -------------------------------------------------------------------------------------

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.jobs

    def count(self, model_id: str | None = None) -> int:
        """Live embedding requests (of one model)."""
        return len(self.jobs) if model_id is None else self.per_model[model_id]

    def requests_of(self, client: str) -> int:
        return self.per_client[client]

    def admit(self, peer: bytes, req: Embed, state: ModelState, inputs: list[list[int]]) -> None:
        """A tokenized request joins its model's queue, or is refused (context, dimensions, limits)."""
        refusal = self._limits(req, state, inputs)
        if refusal is not None:
            return self.shared.refuse(peer, req.request_id, *refusal)
        job = EmbedJob(peer, req.request_id, state.id, req.client, inputs)
        self.jobs[job.request_id] = job
        self.per_model[job.model_id] += 1
        self.per_client[job.client] += 1
        self.queues.setdefault(state.id, deque()).extend((job, i) for i in range(len(inputs)))
        self.shared.registry.touch(state)
        self.shared.reply(peer, Started(job.request_id, job.tokens))

    def _limits(self, req: Embed, state: ModelState, inputs: list[list[int]]) -> tuple | None:
        arch = state.files.config.arch
        if arch not in EMBEDDING_ARCHS:
            return (FailureKind.INVALID_REQUEST, f"model '{state.id}' ({arch}) does not serve embeddings")
        ctx = state.context_length
        longest = max(range(len(inputs)), key=lambda i: len(inputs[i]))
        if len(inputs[longest]) > ctx:
            return (
                FailureKind.CONTEXT_LENGTH_EXCEEDED,
                f"This model's maximum context length is {ctx} tokens. However, '{_where(req, longest)}' "
                f"resulted in {len(inputs[longest])} tokens. Please reduce the length of the input.",
            )
        hidden = state.files.config.hidden_size
        if req.dimensions is not None and not 1 <= req.dimensions <= hidden:
            return (
                FailureKind.INVALID_REQUEST,
                f"'dimensions' is {req.dimensions}; model '{state.id}' gives vectors of at most {hidden} dimensions.",
            )
        engine = self.shared.cfg.engine
        limited = self.admission.limits.refusal(req.client, self.admission.held(req.client))
        if limited is not None:
            return (FailureKind.RATE_LIMITED, *limited)
        if self.per_model[state.id] >= engine.max_waiting:
            message = f"model '{state.id}' has {self.per_model[state.id]} embedding requests waiting; retry shortly"
            return (FailureKind.OVERLOADED, message, RETRY_AFTER_LOADING_S)
        return None

    # -- batches ---------------------------------------------------------------------------------------

    def plan(self, state: ModelState, steps_waiting: bool) -> list[tuple[EmbedJob, int]]:
        """The embedding batch that takes the model's turn (the stepper then ``send``s it), or none:
        nothing queued, or the last turn was a batch and generation has work (its turn, then)."""
        queue = self.queues.get(state.id)
        while queue and queue[0][0].over:
            queue.popleft()
        if not queue:
            self.took_last.discard(state.id)
            return []
        if steps_waiting and state.id in self.took_last:
            self.took_last.discard(state.id)
            return []
        budget = self.shared.cfg.engine.max_batch_tokens
        batch: list[tuple[EmbedJob, int]] = []
        tokens = 0
        while queue:
            job, i = queue[0]
            if job.over:
                queue.popleft()
                continue
            n = len(job.inputs[i])
            if batch and tokens + n > budget:
                break
            batch.append(queue.popleft())
            tokens += n
        if batch:
            self.took_last.add(state.id)
        return batch

    def send(self, state: ModelState, batch: list[tuple[EmbedJob, int]]) -> None:
        """Send a planned batch to every rank of the model; its answer completes its requests."""
        budget = self.shared.cfg.engine.max_batch_tokens
        tokens = sum(len(job.inputs[i]) for job, i in batch)
        step = EmbedStep(state.id, [job.inputs[i] for job, i in batch], budget)
        gen = state.load_gen
        # the watchdog's time for each forward of at most `budget` tokens the batch takes
        timeout = self.shared.cfg.engine.step_timeout_s * max(1, -(-tokens // budget))

        def done(replies: dict, error: CallError | None) -> None:
            if gen != state.load_gen:
                return  # the model was torn down meanwhile; its requests were already failed
            self.stepper.end_embedding(state.id)
            if error:
                self._failed(state, batch, error, timeout)
            else:
                self._apply(state, batch, replies[state.ranks[0]])

        self.shared.calls.call(state.ranks, lambda _: step, timeout, done)

    def _apply(self, state: ModelState, batch: list[tuple[EmbedJob, int]], reply: Embeddings) -> None:
        size = reply.dim * 4
        if len(reply.vectors) != size * len(batch):
            message = f"worker answered {len(reply.vectors)} bytes for {len(batch)} vectors of {reply.dim}"
            log.error("embedding batch of %s: %s", state.id, message)
            for job, _ in batch:
                self.fail(job, FailureKind.INTERNAL, f"embedding failed: {message}")
            return
        touched: dict[str, EmbedJob] = {}
        for k, (job, i) in enumerate(batch):
            if job.over:
                continue
            job.vectors[i] = reply.vectors[k * size : (k + 1) * size]
            job.left -= 1
            touched[job.request_id] = job
        self.shared.registry.touch(state)
        for job in touched.values():
            if job.left:  # progress, so the front knows the leader works on it
                self.shared.reply(job.peer, Delta(job.request_id, "", len(job.inputs) - job.left))
                continue
            data = {"dim": reply.dim, "vectors": b"".join(job.vectors), "prompt_tokens": job.tokens}
            self.shared.stats.embedded(job.model_id, job.tokens)
            self._forget(job)
            self.shared.reply(job.peer, Answer(data=data))

    def _failed(self, state: ModelState, batch: list[tuple[EmbedJob, int]], error: CallError, timeout: float) -> None:
        for job, _ in batch:
            self.fail(job, FailureKind.WORKER_FAILED, f"embedding failed: {error.message}", RETRY_AFTER_LOADING_S)
        if error.kind == CallErrorKind.TIMEOUT:
            self.lifecycle.kill_group(state, f"an embedding batch took longer than {timeout:g}s")
        elif len(state.ranks) > 1 or error.kind == CallErrorKind.DIED:
            self.lifecycle.recover(state, f"an embedding batch failed: {error.message}")

    # -- endings ---------------------------------------------------------------------------------------

    def _forget(self, job: EmbedJob) -> None:
        if job.over:
            return
        job.over = True
        self.jobs.pop(job.request_id, None)
        self.per_model[job.model_id] -= 1
        self.per_client[job.client] -= 1
        for counter, key in ((self.per_model, job.model_id), (self.per_client, job.client)):
            if counter[key] <= 0:
                del counter[key]

    def fail(self, job: EmbedJob, kind: FailureKind, message: str, retry_after: int | None = None) -> None:
        if job.over:
            return
        self._forget(job)
        self.shared.refuse(job.peer, job.request_id, kind, message, retry_after)

    def cancel(self, request_id: str) -> None:
        """The client went away: its inputs not yet sent are skipped, its answer dropped."""
        job = self.jobs.get(request_id)
        if job is not None:
            self._forget(job)

    def fail_model(self, model_id: str, kind: FailureKind, message: str, retry_after: int | None = None) -> None:
        """Every embedding request of the model fails (its load failed, or it is being recovered)."""
        for job in [j for j in self.jobs.values() if j.model_id == model_id]:
            self.fail(job, kind, message, retry_after)
        self.queues.pop(model_id, None)
        self.took_last.discard(model_id)

    def fail_all(self, kind: FailureKind, message: str, retry_after: int | None = None) -> None:
        for job in list(self.jobs.values()):
            self.fail(job, kind, message, retry_after)
        self.queues.clear()

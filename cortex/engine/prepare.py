"""A request's prompt and grammar, prepared off the leader's loop.

The leader's loop drives every running stream: whatever it does inline, every stream waits for.
Rendering a chat template and tokenizing a 7,000-token prompt costs about 30 ms; compiling a
never-seen JSON schema (and, the first time, reading a model's vocabulary into the grammar
compiler) costs hundreds. So a ``Submit`` is prepared by a small thread pool, and the loop takes the
result when the pipe in ``wake_fd`` says one is ready. Compiled grammars are cached by their text
(cortex/engine/constraint.py), so a schema is compiled once however many requests use it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cortex.api.bodies import RESERVED_TEMPLATE_KWARGS
from cortex.chat import prompt as chat_prompt
from cortex.chat.tags import THINK_CLOSE
from cortex.engine.constraint import Constraint, GrammarError, Grammars, ReasoningBudget, Rules
from cortex.models import source
from rpc.engine import FailureKind, Submit


@dataclass
class Prepared:
    prompt: list[int]  # token ids
    prompt_text: str | None  # the rendered chat template, when the prompt came from one
    constraints: list[Constraint | None]  # one per choice (n), None where unconstrained


@dataclass
class Refused:
    """The request cannot be served as sent: answered with this kind and message (a 400)."""

    kind: FailureKind
    message: str


def prepare(files: source.ModelFiles, req: Submit, rules: Rules, grammars: Grammars) -> Prepared | Refused:
    """The prompt's token ids and each choice's grammar state (runs on a preparation thread)."""
    try:
        check_sampling(files, req)
        ids, text = prompt_ids(files, req, rules)
    except ValueError as exc:  # a template that refuses the messages (TemplateRenderError), a bad id
        return Refused(FailureKind.INVALID_REQUEST, str(exc))
    if req.count_only:
        return Prepared(ids, text, [])
    try:
        constraints = [grammars.constraint(rules) for _ in range(req.n)]
    except GrammarError as exc:
        return Refused(FailureKind.INVALID_REQUEST, f"cannot constrain output to the schema: {exc}")
    if req.reasoning_budget is not None and text is not None:  # the prompt's span, or the first the output opens
        close = files.tokenizer.tokenizer.encode(THINK_CLOSE + "\n\n", add_special_tokens=False).ids
        opened = chat_prompt.opens_in_reasoning(text)
        constraints = [ReasoningBudget(c, req.reasoning_budget, close, opened) for c in constraints]
    return Prepared(ids, text, constraints)


def check_sampling(files: source.ModelFiles, req: Submit) -> None:
    """Token ids the sampling parameters name must be the model's (the worker would skip them)."""
    bias = req.sampling.logit_bias
    if bias:
        vocab = files.tokenizer.vocab_size
        bad = next((t for t in bias if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"logit_bias: token id {bad} is outside the vocabulary (0..{vocab - 1})")


def prompt_ids(files: source.ModelFiles, req: Submit, rules: Rules) -> tuple[list[int], str | None]:
    """The prompt's token ids, and its text when it came from a chat template."""
    if req.prompt_ids is not None:
        vocab = files.tokenizer.vocab_size
        bad = next((t for t in req.prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})")
        return list(req.prompt_ids), None
    if req.prompt is not None:
        ids = files.tokenizer.encode(req.prompt)
        if not ids:
            raise ValueError("the prompt is empty: send at least one token of text")
        return ids, None
    reserved = next((k for k in req.template_kwargs or () if k in RESERVED_TEMPLATE_KWARGS), None)
    if reserved is not None:  # the front refuses these; a Submit from elsewhere gets the same answer
        raise ValueError(f"chat_template_kwargs may not set '{reserved}': the server passes it to the template itself")
    thinking = req.thinking
    if rules.json_schema is not None or rules.tool_mode == "required":
        thinking = False  # output constrained from its first token leaves no room for a <think> span
    tools = rules.tools if rules.tool_mode != "none" else None
    text = chat_prompt.render(files.template, req.messages, tools, thinking, req.template_kwargs)
    return files.tokenizer.encode(text), text


class Preparer:
    """The preparation threads, and the results the loop has not taken yet, by request id."""

    def __init__(self, threads: int = 2):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="prepare")
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[Any, concurrent.futures.Future]] = {}  # request id -> (context, future)

    @property
    def wake_fd(self) -> int:
        """Readable when a preparation has finished (the loop polls it)."""
        return self._wake_r

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._pending

    def __len__(self) -> int:
        return len(self._pending)

    def submit(self, request_id: str, context: Any, job: Callable[[], Prepared | Refused]) -> None:
        future = self._pool.submit(job)
        self._pending[request_id] = (context, future)
        future.add_done_callback(lambda _: self._wake())

    def run(self, job: Callable[[], object]) -> None:
        """Run ``job`` on a preparation thread, for its side effect (warming a cache)."""
        self._pool.submit(job)

    def discard(self, request_id: str) -> Any | None:
        """Forget a request (its client left); its context, if it was being prepared."""
        got = self._pending.pop(request_id, None)
        if got is None:
            return None
        got[1].cancel()
        return got[0]

    def finished(self) -> list[tuple[str, Any, Prepared | Refused | BaseException]]:
        """(request id, context, result or the exception it raised) of every finished preparation."""
        self._drain_wakeups()
        done = [rid for rid, (_, f) in self._pending.items() if f.done()]
        out = []
        for rid in done:
            context, future = self._pending.pop(rid)
            out.append((rid, context, future.exception() or future.result()))
        return out

    def abandon(self) -> list[Any]:
        """Stop: every pending request's context, for the caller to answer."""
        contexts = [context for context, _ in self._pending.values()]
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:  # a thread finishing now must not write to a closed (or reused) descriptor
            os.close(self._wake_w)
            self._wake_w = -1
        os.close(self._wake_r)
        return contexts

    def _wake(self) -> None:
        with self._lock:
            if self._wake_w >= 0:
                with contextlib.suppress(BlockingIOError):  # the pipe is full: the loop is awake anyway
                    os.write(self._wake_w, b"\0")

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

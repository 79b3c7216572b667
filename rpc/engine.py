"""HTTP front <-> leader messages: requests in, token events out.

The front sends one ``Submit`` per generation and then reads events for that request id until a
``Finished`` or an ``Error`` (or one ``Forward``: another leader serves it). Queries (models, health) get a single ``Answer``. The request is
dialect-neutral: both the OpenAI and the Anthropic resources build the same ``Submit``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from rpc.codec import Message, Part
from rpc.messages import SamplingParams


class FailureKind(StrEnum):
    """Why a request (or an operator's command) failed. The front maps each kind to an HTTP status
    and each dialect's error type (``cortex/api/errors.py`` FAILURES, one entry per kind)."""

    MODEL_NOT_FOUND = "model_not_found"  # no model (or alias) of that name, here or on any peer
    MODEL_LOADING = "model_loading"  # too many requests already wait for its load
    MODEL_FAILED = "model_failed"  # its load failed; an operator's load retries it
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # prompt (+ max_tokens) over its context
    INVALID_REQUEST = "invalid_request"  # well-formed but unservable (unknown tool, bad schema, limit)
    WORKER_FAILED = "worker_failed"  # a worker died or a step failed mid-generation
    OVERLOADED = "overloaded"  # the model's queue is full, or the request waited too long in it
    SHUTTING_DOWN = "shutting_down"
    DRAINING = "draining"  # the node refuses new requests (cortex-admin drain, SIGTERM)
    ENGINE_UNAVAILABLE = "engine_unavailable"  # the front cannot reach its leader
    CONFLICT = "conflict"  # an operator's command that the model's state forbids now
    INSUFFICIENT_MEMORY = "insufficient_memory"  # no room even after every eviction allowed
    MODEL_TOO_LARGE = "model_too_large"  # larger than a device's whole budget: retrying cannot help
    INTERNAL = "internal"  # a bug; the request fails, the node goes on
    RATE_LIMITED = "rate_limited"  # the client's in-flight limit
    FLEET_UNAVAILABLE = "fleet_unavailable"  # the model is known only to nodes that are down
    REJECTED = "rejected"  # an operator's command refused as a whole (e.g. a reload of a broken file)


class NodeStatus(StrEnum):
    """A node's readiness, the ``status`` of its ``Query("health")`` answer and of ``GET /health``."""

    OK = "ok"  # every wanted model loaded, every worker up
    DEGRADED = "degraded"  # serving, with something broken: a worker restarting, a model failed
    LOADING = "loading"  # not serving yet: workers starting, preloaded models loading
    DRAINING = "draining"  # refusing new requests (cortex-admin drain, SIGTERM)

    @property
    def serving(self) -> bool:
        """Whether load balancers should send it requests (``/health`` answers 200)."""
        return self in (NodeStatus.OK, NodeStatus.DEGRADED)


class Submit(Message):
    request_id: str
    model: str
    messages: list[dict[str, Any]]  # chat messages, already validated by the front
    sampling: SamplingParams
    max_tokens: int | None = None
    stop: list[str] | None = None
    template_kwargs: dict[str, Any] | None = None
    ignore_eos: bool = False  # generate to max_tokens even past EOS (vLLM's extension; benchmarks)
    count_only: bool = False  # answer {"input_tokens": n} for the prompt instead of generating
    client: str = ""  # who is asking (API key or address), for per-client limits
    stop_token_ids: list[int] | None = None
    n: int = 1  # completions to generate for the prompt (choices 0 .. n-1)
    # a raw prompt instead of messages (/v1/completions): text, or token ids
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    # tools: [{"name", "description", "parameters"}]; tool_choice: none | auto | required, and a
    # forced function's name in tool_name (required narrowed to that one function)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str = "auto"
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    json_schema: dict[str, Any] | None = None  # constrain output to this schema ({}: any JSON object)
    thinking: bool | None = None  # None: the model's default; False: ask a thinking model not to think
    reasoning_budget: int | None = None  # most tokens of a reasoning span the prompt opens; then it is closed
    hop: bool = False  # forwarded by a peer leader: serve it here or fail, never forward it again
    cache_salt: str | None = None  # prompts share cached KV only with requests of the same salt


class Cancel(Message):
    request_id: str


class Embed(Message):
    """POST /v1/embeddings: one vector per input, from the model's final hidden state (after its
    final norm) at each input's last token, L2-normalised; no chat template, no sampling. Inputs are
    text (``inputs``, tokenized with the model's tokenizer) or token ids (``input_ids``): one of the
    two. Events: ``Waiting`` while the model loads, ``Started`` once admitted, a ``Delta`` (no text;
    ``completion_tokens``: inputs done) after each batch that did not finish it, then one ``Answer``
    {"dim": int, "vectors": bytes (little-endian float32, len(inputs) * dim), "prompt_tokens": int},
    or a ``Failure`` (or one ``Forward``, as for a Submit)."""

    request_id: str
    model: str
    inputs: list[str] | None = None
    input_ids: list[list[int]] | None = None
    dimensions: int | None = None  # checked against the model's hidden size; the front truncates
    client: str = ""  # who is asking, for per-client limits
    hop: bool = False  # forwarded by a peer leader: serve it here or fail, never forward it again


class Query(Message):
    what: str  # "models" | "health"


class ModelOp(Message):
    """Operator request: load or unload a catalogue model. Answered when done (Answer or Failure)."""

    op: str  # load | unload
    model: str


class PeerFailed(Message):
    """The front could not get an answer from a peer it was sent to (no reply, or a 5xx before any
    byte): the leader counts it toward that peer's cooldown and re-polls it."""

    endpoint: str  # the Target's endpoint
    reason: str


class Answer(Message):
    data: dict[str, Any]


class Started(Message):
    request_id: str
    prompt_tokens: int
    reasoning: bool = False  # the prompt opened a <think> span: the output starts as reasoning


class Waiting(Message):
    """Accepted, but the model is still loading: Started (or a Failure) follows once it is."""

    request_id: str
    reason: str


class Target(Part):
    """A leader a request may be forwarded to."""

    node: str
    endpoint: str  # base URL, e.g. http://benjy.internal:31313
    key: str = ""  # the credential to present there ("" = none)
    model: str = ""  # when set, the body's model is rewritten to this id (an alias the target does not know)


class Forward(Message):
    """Answer to a Submit that another leader should serve: the front proxies the client's original
    HTTP request to ``targets[0]``, and once to ``targets[1]`` if the first refuses or is unreachable.
    ``valid_s``: how long the front may send later requests naming the same model to the same targets
    without asking again (0: not at all); see cortex/fleet/routes.py."""

    request_id: str
    targets: list[Target]
    reason: str
    valid_s: float = 0.0


class Delta(Message):
    request_id: str
    text: str
    completion_tokens: int
    # when asked for: one entry per token sampled since the last Delta:
    # {"token": str, "logprob": float, "bytes": [int], "top_logprobs": [{"token", "logprob", "bytes"}]}
    logprobs: list[dict[str, Any]] | None = None
    index: int = 0  # which of the request's n choices
    cached_tokens: int = 0  # prompt tokens found in the prefix cache (known once the sequence is scheduled)
    # several tokens in one Delta (a multi-step): how many characters of ``text`` each one made, in
    # order, so the front counts tokens where they fell (e.g. inside a reasoning span); None: one token
    pieces: list[int] | None = None


class Finished(Message):
    request_id: str
    finish_reason: str  # stop | length
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    index: int = 0  # which of the request's n choices
    stop_sequence: str | None = None  # the stop string that ended it, when one did


class ContextOverflow(Part):
    """The numbers of a ``context_length_exceeded`` failure, so each dialect words it its own way
    (OpenAI's text, Anthropic's exact texts, which Claude Code acts on) without reading a message."""

    limit: int  # the model's context, prompt and completion together
    prompt_tokens: int
    max_tokens: int | None = None  # the completion asked for; None: the prompt alone is over the limit


def context_message(over: ContextOverflow) -> str:
    """OpenAI's words for an overflow (its ``message``; cortex/api/errors.py words Anthropic's)."""
    if over.max_tokens is None:
        return (
            f"This model's maximum context length is {over.limit} tokens. However, your messages "
            f"resulted in {over.prompt_tokens} tokens. Please reduce the length of the messages."
        )
    return (
        f"This model's maximum context length is {over.limit} tokens. However, you requested "
        f"{over.prompt_tokens + over.max_tokens} tokens ({over.prompt_tokens} in the messages, "
        f"{over.max_tokens} in the completion). Please reduce the length of the messages or completion."
    )


class Failure(Message):
    """A request-level error; ``kind`` decides the HTTP status the front answers with."""

    request_id: str
    kind: FailureKind
    message: str
    retry_after: int | None = None
    overflow: ContextOverflow | None = None  # with CONTEXT_LENGTH_EXCEEDED from admission: its numbers

"""HTTP front <-> leader messages: requests in, token events out.

The front sends one ``Submit`` per generation and then reads events for that request id until a
``Finished`` or an ``Error`` (or one ``Forward``: another leader serves it). Queries (models, health) get a single ``Answer``. The request is
dialect-neutral: both the OpenAI and the Anthropic resources build the same ``Submit``.
"""

from __future__ import annotations

from typing import Any

from rpc.codec import Message, Part
from rpc.messages import SamplingParams


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
    hop: bool = False  # forwarded by a peer leader: serve it here or fail, never forward it again


class Cancel(Message):
    request_id: str


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
    HTTP request to ``targets[0]``, and once to ``targets[1]`` if the first refuses or is unreachable."""

    request_id: str
    targets: list[Target]
    reason: str


class Delta(Message):
    request_id: str
    text: str
    completion_tokens: int
    # when asked for: one entry per token sampled since the last Delta:
    # {"token": str, "logprob": float, "bytes": [int], "top_logprobs": [{"token", "logprob", "bytes"}]}
    logprobs: list[dict[str, Any]] | None = None
    index: int = 0  # which of the request's n choices


class Finished(Message):
    request_id: str
    finish_reason: str  # stop | length
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    index: int = 0  # which of the request's n choices
    stop_sequence: str | None = None  # the stop string that ended it, when one did


class Failure(Message):
    """A request-level error; ``kind`` decides the HTTP status the front answers with."""

    request_id: str
    kind: str  # model_not_found | model_loading | model_failed | context_length_exceeded | invalid_request | worker_failed | overloaded | shutting_down | draining | conflict | rate_limited
    message: str
    retry_after: int | None = None

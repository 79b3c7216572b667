"""What the HTTP API answers, declared as types for /openapi.json (``cortex.api.openapi``).

The resources build their answers as plain dicts (a streamed chunk is a few fields; typing each
would buy nothing), so these classes describe rather than encode: tests/test_fuzz.py checks every
answer a real server gives against the schemas made from them. A field that is ``UNSET`` by default
may be absent; one with no default is always sent (``| None``: possibly as null).
"""

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

from cortex.api.bodies import AnthropicTextBlock, AnthropicThinkingBlock, AnthropicToolUseBlock


def doc(type_: Any, text: str | None, **more: Any) -> Any:
    return Annotated[type_, Meta(description=text, **more)]


Finish = Literal["stop", "length", "tool_calls"]
# the values of cortex.models.registry.ModelStatus (tests/test_openapi.py keeps them equal); the front
# does not import the leader's modules
Status = Literal["unloaded", "loading", "loaded", "recovering", "failed"]


# -- OpenAI ------------------------------------------------------------------------------------------


class TokenLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobs(TokenLogprob):
    """A generated token, and the likeliest alternatives at its place."""

    top_logprobs: list[TokenLogprob] | UnsetType = UNSET


class ChoiceLogprobs(Struct):
    content: list[TokenLogprobs] | UnsetType = UNSET


class PromptTokensDetails(Struct):
    cached_tokens: doc(int, "Prompt tokens served from cache.") | UnsetType = UNSET


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | UnsetType = UNSET


class ToolCallFunction(Struct):
    name: str | UnsetType = UNSET
    arguments: doc(str, "JSON-encoded arguments.") | UnsetType = UNSET


class ToolCall(Struct):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class AssistantMessage(Struct):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: doc(str | None, "The model's thinking, when it thinks.") | UnsetType = UNSET
    tool_calls: list[ToolCall] | UnsetType = UNSET


class ChatChoice(Struct):
    index: int
    message: AssistantMessage
    finish_reason: Finish
    logprobs: ChoiceLogprobs | None | UnsetType = UNSET


Created = doc(int, "Unix seconds.")


class ChatCompletion(Struct):
    id: str
    object: Literal["chat.completion"]
    created: Created
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDelta(Struct):
    index: int
    id: str | UnsetType = UNSET
    type: Literal["function"] | UnsetType = UNSET
    function: ToolCallFunction | UnsetType = UNSET


class ChunkDelta(Struct):
    role: Literal["assistant"] | UnsetType = UNSET
    content: str | None | UnsetType = UNSET
    reasoning_content: doc(str | None, "The model's thinking, when it thinks.") | UnsetType = UNSET
    tool_calls: list[ToolCallDelta] | UnsetType = UNSET


class ChunkChoice(Struct):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None | UnsetType = UNSET
    finish_reason: Finish | None | UnsetType = UNSET


class ChatCompletionChunk(Struct):
    """One SSE `data:` line; the last choice chunk is followed (with stream_options.include_usage) by a
    chunk with empty choices and usage, then `data: [DONE]`. An error mid-stream is sent as one `data:`
    line holding the OpenAI error object."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: Created
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None | UnsetType = UNSET


class LegacyLogprobs(Struct):
    tokens: list[str] | UnsetType = UNSET
    token_logprobs: list[float] | UnsetType = UNSET
    top_logprobs: list[dict[str, float]] | None | UnsetType = UNSET
    text_offset: list[int] | UnsetType = UNSET


class TextChoice(Struct):
    index: int
    text: str
    finish_reason: Finish | None
    logprobs: LegacyLogprobs | None | UnsetType = UNSET


class TextCompletion(Struct):
    """The response, and (streamed) each SSE `data:` line before `data: [DONE]`."""

    id: str
    object: Literal["text_completion"]
    created: Created
    model: str
    choices: list[TextChoice]
    usage: Usage | None | UnsetType = UNSET


class ErrorDetail(Struct):
    message: str
    type: doc(str, None, examples=["invalid_request_error", "service_unavailable", "rate_limit_error"])
    param: doc(str | None, "The request field at fault.")
    code: doc(str | None, None, examples=["model_not_found", "context_length_exceeded", "model_loading"])


class OpenAIError(Struct):
    error: ErrorDetail


# -- models and the fleet ----------------------------------------------------------------------------


class EngineCounters(Struct):
    """Scheduler and KV cache counters, while loaded."""

    running: int | UnsetType = UNSET
    waiting: int | UnsetType = UNSET
    preemptions: int | UnsetType = UNSET
    kv_blocks_total: int | UnsetType = UNSET
    kv_blocks_used: int | UnsetType = UNSET
    kv_block_size: int | UnsetType = UNSET
    kv_blocks_cached: int | UnsetType = UNSET
    kv_dtype: doc(str | None, "What the KV pool holds: float32, float16 or bfloat16.") | UnsetType = UNSET


class ModelState(Struct):
    id: str
    status: Status
    devices: list[str]
    tensor_parallel: int | UnsetType = UNSET
    task: Literal["generate", "embed"] | UnsetType = UNSET
    context_length: int | None | UnsetType = UNSET
    param_bytes: int | UnsetType = UNSET
    rank_bytes: list[int] | UnsetType = UNSET
    size_bytes: doc(int, "Bytes per device: weights (measured once loaded) and KV pool.") | UnsetType = UNSET
    pinned: doc(bool, "Never evicted (the catalogue's `pinned`, or a pin operation).") | UnsetType = UNSET
    residency_priority: int | UnsetType = UNSET
    loads: int | UnsetType = UNSET
    load_seconds: float | UnsetType = UNSET
    evictions: int | UnsetType = UNSET
    idle_s: doc(float | None, "Seconds since it was last used.") | UnsetType = UNSET
    in_flight: int | UnsetType = UNSET
    queued: doc(int, "Requests queued or waiting for it to load.") | UnsetType = UNSET
    error: str | None | UnsetType = UNSET
    engine: EngineCounters | UnsetType = UNSET


class ModelLocation(Struct):
    node: str | UnsetType = UNSET
    status: Status | UnsetType = UNSET
    devices: list[str] | UnsetType = UNSET


class Model(Struct):
    id: str
    object: Literal["model"]
    created: doc(int, "0: the same on every leader of the fleet.")
    owned_by: doc(str, "Always cortex: the fleet, whichever leader answers.")
    resident_on: doc(list[str], "Nodes where it is loaded now.")
    loadable_on: doc(list[str], "Other nodes that could load it.")
    status: doc(Status, "Its best status on any node: loaded when resident somewhere.") | UnsetType = UNSET
    context_length: doc(int | None, "The smallest any node reports.") | UnsetType = UNSET
    task: (
        doc(Literal["generate", "embed"], "generate: chat, completions, messages, responses; embed: /v1/embeddings.")
        | UnsetType
    ) = UNSET
    devices: doc(list[str], "The devices holding it, node by node in resident_on order.") | UnsetType = UNSET
    locations: list[ModelLocation] | UnsetType = UNSET
    alias_for: doc(str, "Set on an alias: the model it names.") | UnsetType = UNSET


class ModelList(Struct):
    object: Literal["list"]
    data: list[Model]


class ModelTable(Struct):
    models: list[ModelState]
    aliases: dict[str, str]


class ModelOpResult(Struct):
    model: ModelState


class FleetNode(Struct):
    name: str | UnsetType = UNSET
    endpoint: str | UnsetType = UNSET
    self: bool | UnsetType = UNSET
    up: bool | UnsetType = UNSET
    cooling: bool | UnsetType = UNSET
    status: str | None | UnsetType = UNSET
    draining: bool | UnsetType = UNSET
    devices: list[dict[str, Any]] | UnsetType = UNSET
    requests: dict[str, Any] | UnsetType = UNSET
    error: str | None | UnsetType = UNSET


class Fleet(Struct):
    node: doc(str, "The leader that answered.")
    status: Literal["ok", "degraded", "isolated"]
    nodes: list[FleetNode]
    models: list[Model]


class Worker(Struct):
    rank: int | UnsetType = UNSET
    device: str | UnsetType = UNSET
    pid: int | None | UnsetType = UNSET
    alive: bool | UnsetType = UNSET
    ready: bool | UnsetType = UNSET
    restarts: int | UnsetType = UNSET
    last_exit: doc(str | None, "How its last process ended, if it restarted.") | UnsetType = UNSET


class DeviceMemory(Struct):
    rank: int | UnsetType = UNSET
    device: str | UnsetType = UNSET
    budget_bytes: doc(int | None, "Bytes models may use; null: not accounted.") | UnsetType = UNSET
    used_bytes: int | UnsetType = UNSET
    free_bytes: int | None | UnsetType = UNSET
    evictable_bytes: doc(int, "Held by idle, unpinned models.") | UnsetType = UNSET
    load_unload_cycles: doc(int, "Since its worker (re)started.") | UnsetType = UNSET


class Eviction(Struct):
    strategy: Literal["lru", "priority"] | UnsetType = UNSET
    evictions: doc(dict[str, int], "By reason.") | UnsetType = UNSET
    defrag_restarts: int | UnsetType = UNSET
    loads_cancelled: int | UnsetType = UNSET
    loads: int | UnsetType = UNSET


class RequestCounts(Struct):
    running: int | UnsetType = UNSET
    waiting: int | UnsetType = UNSET


class Health(Struct):
    status: Literal["ok", "loading", "degraded", "draining", "down"]
    draining: doc(bool, "New requests are refused (cortex-admin drain, or shutting down).") | UnsetType = UNSET
    node: str | UnsetType = UNSET
    uptime_s: float | UnsetType = UNSET
    pid: int | UnsetType = UNSET
    workers: list[Worker] | UnsetType = UNSET
    models: list[ModelState] | UnsetType = UNSET
    devices: list[DeviceMemory] | UnsetType = UNSET
    eviction: Eviction | UnsetType = UNSET
    requests: RequestCounts | UnsetType = UNSET
    error: doc(str, "With status down: why.") | UnsetType = UNSET


# -- Anthropic ---------------------------------------------------------------------------------------

OutBlock = AnthropicTextBlock | AnthropicToolUseBlock | AnthropicThinkingBlock
StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class AnthropicUsage(Struct):
    input_tokens: doc(int, "Prompt tokens not served from cache.")
    output_tokens: int
    cache_read_input_tokens: int | UnsetType = UNSET
    cache_creation_input_tokens: int | UnsetType = UNSET


class AnthropicMessageResponse(Struct):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[OutBlock]
    stop_reason: StopReason | None
    usage: AnthropicUsage
    stop_sequence: str | None | UnsetType = UNSET


class TokenCount(Struct):
    input_tokens: int


class TextDelta(Struct, tag_field="type", tag="text_delta"):
    text: str


class InputJsonDelta(Struct, tag_field="type", tag="input_json_delta"):
    partial_json: str


class ThinkingDelta(Struct, tag_field="type", tag="thinking_delta"):
    thinking: str


class SignatureDelta(Struct, tag_field="type", tag="signature_delta"):
    signature: str


class MessageStart(Struct, tag_field="type", tag="message_start"):
    message: AnthropicMessageResponse


class ContentBlockStart(Struct, tag_field="type", tag="content_block_start"):
    index: int
    content_block: OutBlock


class ContentBlockDelta(Struct, tag_field="type", tag="content_block_delta"):
    index: int
    delta: TextDelta | InputJsonDelta | ThinkingDelta | SignatureDelta


class ContentBlockStop(Struct, tag_field="type", tag="content_block_stop"):
    index: int


class StopDelta(Struct):
    stop_reason: StopReason | UnsetType = UNSET
    stop_sequence: str | None | UnsetType = UNSET


class MessageDelta(Struct, tag_field="type", tag="message_delta"):
    delta: StopDelta
    usage: AnthropicUsage | UnsetType = UNSET


class MessageStop(Struct, tag_field="type", tag="message_stop"):
    pass


class Ping(Struct, tag_field="type", tag="ping"):
    pass


AnthropicStreamEvent = Annotated[
    MessageStart | ContentBlockStart | ContentBlockDelta | ContentBlockStop | MessageDelta | MessageStop | Ping,
    Meta(description="The `data:` of one SSE event; its `event:` line names the same type (or error)."),
]


class AnthropicErrorDetail(Struct):
    type: doc(str, None, examples=["invalid_request_error", "not_found_error", "overloaded_error", "api_error"])
    message: str


class AnthropicError(Struct):
    type: Literal["error"]
    error: AnthropicErrorDetail


REPLIES = (
    ChatCompletion,
    ChatCompletionChunk,
    TextCompletion,
    OpenAIError,
    ModelList,
    ModelTable,
    ModelOpResult,
    Fleet,
    Health,
    AnthropicMessageResponse,
    TokenCount,
    AnthropicError,
)

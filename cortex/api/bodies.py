"""The HTTP request bodies, each declared once: types, ranges, enums, defaults and a line of doc.

From these classes come both the decoding of every request (``cortex.api.validation.decode``) and
the request schemas of /openapi.json (``msgspec.json.schema_components``), so the bounds a client
reads in the document are the ones the server enforces.

Why msgspec and not a field table of our own: the resources get typed objects decoded and checked
in C (a typical chat body several times faster than the old field-by-field walk over ``json.loads``),
and msgspec writes the JSON Schema itself. Its error texts ("Expected `float` <= 2.0 - at
`$.temperature`") are not the API's, so only the *path* of an error is used: ``validation`` walks the
declaration down it and words the message as the API always has ("Invalid value for 'temperature':
9 is greater than the maximum of 2."). A field whose message is its own carries it as ``says(...)``:
``type`` (the wrong JSON type), ``value`` (out of range, not one of the enum, too long), ``missing``,
``any`` (all three), ``inner`` (anything wrong inside it). A template sees {at} (the field's path),
{up} (the enclosing object's), {param} (the path the error names: the field's, or ``param`` levels
up), {value} and {key}; a callable gets the ``validation.Failure`` and may return None to pass.

Explicit null means "not given" for every top-level field: ``Body`` puts the default back. JSON has
no NaN or Infinity, so neither gets this far; integers must fit 64 bits; a boolean is no integer;
unknown fields are ignored. What types cannot say (a forced tool that is not in ``tools``, a tool
result in an assistant turn) the resources check once the body is decoded.
"""

from functools import cache
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta, Struct

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
TOKEN_ID_END = 2**31  # token ids are int32 on the wire
# what the chat template renderer passes a template itself (cortex/chat/template.py, ChatTemplate:
# render's arguments and its environment's globals): chat_template_kwargs may not set them
RESERVED_TEMPLATE_KWARGS = (
    "messages",
    "tools",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
    "raise_exception",
    "strftime_now",
)


def says(param: int = 0, **texts: Any) -> Meta:
    """The field's own error messages (see above); the error names the object ``param`` levels up."""
    return Meta(extra={**texts, "param": param})


def num(lo: float, hi: float) -> Any:
    return Annotated[float, Meta(ge=lo, le=hi)]


def integer(lo: int = INT64_MIN, hi: int = INT64_MAX) -> Any:
    return Annotated[int, Meta(ge=lo, le=hi)]


def opt(type_: Any, doc: str | None = None) -> Any:
    """``type_`` or null (read as "not given")."""
    return Annotated[type_ | None, Meta(description=doc)] if doc else type_ | None


def _object(factory: Any) -> Any:
    return msgspec.field(default_factory=factory)


TokenId = integer(0, TOKEN_ID_END - 1)


class Body(Struct, kw_only=True):
    """A request body: an explicit null is the field's default."""

    dots: ClassVar[bool] = False  # paths in messages: messages[0].role (OpenAI) or messages.0.role (Anthropic)

    def __post_init__(self) -> None:
        for name, default in _defaults(type(self)):
            if getattr(self, name) is None:
                setattr(self, name, default)


@cache
def _defaults(cls: type) -> tuple[tuple[str, Any], ...]:
    return tuple((f.name, f.default) for f in msgspec.structs.fields(cls) if f.default not in (None, msgspec.NODEFAULT))


# -- OpenAI ------------------------------------------------------------------------------------------

ROLES = ("system", "developer", "user", "assistant", "tool")
NOT_A_PART = "Invalid content part at '{param}': expected an object with a 'type'."
NOT_A_CALL = "Invalid tool call at '{param}': expected a function with a name."
NOT_A_TOOL = "Invalid tool at '{param}': expected a function with a name."
NO_SCHEMA = "'response_format.json_schema.schema' must be a JSON schema object."
BAD_CHOICE = "'tool_choice' must be none, auto, required or a named function."
BAD_STOP = "'stop' must be a string or an array of at most 4 strings."
BAD_PROMPT = "Invalid 'prompt': expected a string or an array of token ids."


class TextPart(Struct):
    type: Annotated[
        Literal["text"],
        says(
            1, missing=NOT_A_PART, type=NOT_A_PART, value="Content part type '{value}' is not supported by this model."
        ),
    ]
    text: Annotated[str, says(any="Missing or invalid 'text' in '{up}'.")]


class FunctionCall(Struct):
    name: Annotated[str, says(2, any=NOT_A_CALL)]
    arguments: Annotated[
        str | dict[str, Any],
        Meta(description="A JSON object, or one JSON-encoded."),
        says(any="Tool call arguments must be a JSON object."),
    ] = "{}"


class ToolCallIn(Struct):
    """A call the assistant made earlier in the conversation."""

    function: Annotated[FunctionCall, says(1, type=NOT_A_CALL, missing=NOT_A_CALL)]
    id: str | None = None
    type: Literal["function"] = "function"


class ChatMessage(Struct):
    """One turn; developer is read as system. An assistant turn may carry its earlier tool calls."""

    role: Annotated[Literal[ROLES], says(any=f"Invalid value for '{{at}}': expected one of {', '.join(ROLES)}.")]
    content: Annotated[
        str | list[Annotated[TextPart, says(type=NOT_A_PART)]] | None,
        Meta(description="A string, or an array of text parts (other part types are refused with a 400)."),
        says(type="Invalid type for '{at}': expected a string or an array of content parts."),
    ] = None
    name: str | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    tool_calls: Annotated[
        list[Annotated[ToolCallIn, says(type=NOT_A_CALL)]] | None,
        says(type="Invalid type for '{at}': expected an array."),
    ] = None


class FunctionDef(Struct):
    name: Annotated[str, Meta(min_length=1), says(2, any=NOT_A_TOOL)]
    description: str | None = None
    parameters: Annotated[dict[str, Any], says(any="Function parameters must be a JSON schema object.")] = _object(
        lambda: {"type": "object", "properties": {}}
    )
    strict: bool | None = None


class Tool(Struct):
    type: Annotated[Literal["function"], says(1, any=NOT_A_TOOL)]
    function: Annotated[FunctionDef, says(1, type=NOT_A_TOOL, missing=NOT_A_TOOL)]


class FunctionName(Struct):
    name: str


class NamedToolChoice(Struct):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(Struct):
    schema: Annotated[dict[str, Any] | None, says(2, any=NO_SCHEMA)] = None
    name: str | None = None
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(Struct):
    """text (the default), json_object (any JSON object), or json_schema (output that follows the schema)."""

    type: Annotated[
        Literal["text", "json_object", "json_schema"],
        says(1, any="Unknown response_format type {value!r}: expected text, json_object or json_schema."),
    ] = "text"
    json_schema: Annotated[JsonSchemaFormat | None, says(1, type=NO_SCHEMA)] = None


class StreamOptions(Struct):
    include_usage: bool | None = None


class OpenAIBody(Body, kw_only=True):
    """Sampling and length fields shared by the OpenAI endpoints."""

    model: Annotated[str, Meta(description="A catalogue model id or alias (GET /v1/models).")]
    stream: opt(bool) = False
    stream_options: opt(StreamOptions) = None
    n: opt(integer(1, 16), "Choices generated from the one prompt.") = 1
    max_tokens: opt(integer(1), "Most tokens to generate per choice; default: up to the context.") = None
    temperature: opt(num(0, 2)) = 1.0
    top_p: opt(num(0, 1)) = 1.0
    top_k: opt(integer(0), "0 disables top-k.") = 0
    seed: opt(integer(), "Same seed, same output, whatever else is batched with it.") = None
    min_p: opt(num(0, 1)) = 0.0
    presence_penalty: opt(num(-2, 2)) = 0.0
    frequency_penalty: opt(num(-2, 2)) = 0.0
    repetition_penalty: opt(num(0.01, 10)) = 1.0
    logit_bias: Annotated[
        dict[
            Annotated[str, Meta(pattern="^[0-9]{1,9}$")],
            Annotated[
                num(-100, 100), says(1, value="Invalid logit_bias value {value} for token {key}: expected -100 to 100.")
            ],
        ]
        | None,
        Meta(description="Token id (as a string) to a bias added to its logit."),
        says(inner="'logit_bias' maps token ids to numbers between -100 and 100."),
    ] = None
    stop: Annotated[
        str | Annotated[list[str], Meta(max_length=4)] | None,
        Meta(description="Text that ends a choice; it is not included in the output."),
        says(value=BAD_STOP, inner=BAD_STOP),
    ] = None
    stop_token_ids: Annotated[list[TokenId] | None, says(inner="'stop_token_ids' must be an array of token ids.")] = (
        None
    )
    ignore_eos: opt(bool, "Keep generating past end-of-sequence.") = False


class ChatCompletionRequest(OpenAIBody, kw_only=True):
    """POST /v1/chat/completions."""

    messages: Annotated[
        list[Annotated[ChatMessage, says(type="Invalid type for '{at}': expected an object.")]],
        Meta(min_length=1),
        says(value="'messages' must contain at least one message."),
    ]
    max_completion_tokens: opt(integer(1), "Takes precedence over max_tokens.") = None
    logprobs: opt(bool) = False
    top_logprobs: opt(integer(0, 20), "Requires logprobs: true.") = None
    tools: opt(list[Annotated[Tool, says(type=NOT_A_TOOL)]]) = None
    tool_choice: Annotated[
        Literal["none", "auto", "required"] | NamedToolChoice | None, says(any=BAD_CHOICE, inner=BAD_CHOICE)
    ] = None
    parallel_tool_calls: opt(bool) = True
    response_format: opt(ResponseFormat) = None
    reasoning_effort: Annotated[
        Literal["none", "minimal", "low", "medium", "high"] | None,
        says(value="'reasoning_effort' must be one of none, minimal, low, medium, high."),
    ] = None
    chat_template_kwargs: opt(
        dict[str, Any],
        "Extra variables for the chat template, e.g. enable_thinking; not the ones the server passes itself: "
        f"{', '.join(RESERVED_TEMPLATE_KWARGS)} (a 400).",
    ) = None


class CompletionRequest(OpenAIBody, kw_only=True):
    """POST /v1/completions: a raw prompt, no chat template."""

    prompt: Annotated[
        str | list[int | str | list[int]],
        Meta(description="Text or token ids; a batch may hold one prompt (several are refused with a 400)."),
        says(type=BAD_PROMPT, inner=BAD_PROMPT),
    ]
    max_tokens: opt(integer(1)) = 16  # OpenAI's default for completions
    echo: opt(bool, "Prepend the prompt: a text one, not streamed.") = False
    logprobs: opt(integer(0, 5), "Report logprobs, with this many alternatives per token.") = None
    best_of: Annotated[
        Literal[1] | None, Meta(description="Not supported beyond 1."), says(any="'best_of' is not supported.")
    ] = None
    suffix: Annotated[None, Meta(description="Not supported."), says(any="'suffix' is not supported.")] = None


# -- Anthropic ---------------------------------------------------------------------------------------


def _not_text(f: Any) -> str:
    """A block of a system prompt or tool result that is not a text block."""
    kind = f.owner.get("type") if isinstance(f.owner, dict) else type(f.owner).__name__
    return f"{f.at}: block type {kind!r} is not supported here; expected text."


def _unexpected(f: Any) -> str | None:
    """A content block that is no block, or of no type we know (a text block's text counts too)."""
    kind = f.owner.get("type") if isinstance(f.owner, dict) else None
    if f.below[:1] not in ((), ("type",)) and kind != "text":
        return None  # a field of a known block: its own message
    return f"{f.at}: unexpected content block {kind!r} in a {f.above(2).get('role')} message."


class AnthropicTextBlock(Struct, tag_field="type", tag="text"):
    text: str


TextBlocks = Annotated[
    str | list[Annotated[AnthropicTextBlock, says(type=_not_text, inner=_not_text)]],
    says(type="{at}: expected a string or an array of text blocks."),
]
BAD_USE = "{param}: tool_use needs a name and an input object."


class AnthropicToolUseBlock(Struct, tag_field="type", tag="tool_use"):
    name: Annotated[str, says(1, any=BAD_USE)]
    id: str | None = None
    input: Annotated[dict[str, Any], says(1, any=BAD_USE)] = {}


class AnthropicThinkingBlock(Struct, tag_field="type", tag="thinking"):
    thinking: str = ""
    signature: str | None = None


class AnthropicRedactedThinkingBlock(Struct, tag_field="type", tag="redacted_thinking"):
    """Dropped."""

    data: str | None = None


class AnthropicToolResultBlock(Struct, tag_field="type", tag="tool_result"):
    tool_use_id: str | None = None
    content: TextBlocks | None = None
    is_error: bool | None = None


class AnthropicImageBlock(Struct, tag_field="type", tag="image"):
    """Refused with a 400: no model here reads images."""

    source: dict[str, Any] | None = None


class AnthropicDocumentBlock(Struct, tag_field="type", tag="document"):
    """Refused with a 400: no model here reads documents."""

    source: dict[str, Any] | None = None


Block = (
    AnthropicTextBlock
    | AnthropicToolUseBlock
    | AnthropicThinkingBlock
    | AnthropicRedactedThinkingBlock
    | AnthropicToolResultBlock
    | AnthropicImageBlock
    | AnthropicDocumentBlock
)


class AnthropicMessage(Struct):
    """A user turn (text, tool results) or an assistant turn (text, thinking, tool use)."""

    role: Annotated[
        Literal["user", "assistant", "system"],
        Meta(description="system entries (as Claude Code sends them) are folded into the system prompt, in order."),
        says(1, any="{param}.role: expected 'user', 'assistant' or 'system'."),
    ]
    content: Annotated[
        str | list[Annotated[Block, says(type=_unexpected, inner=_unexpected)]],
        says(any="{at}: expected a string or an array of content blocks."),
    ]


class AnthropicTool(Struct):
    name: Annotated[str, Meta(min_length=1), says(1, any="{param}: a tool needs a name.")]
    description: str | None = None
    input_schema: Annotated[dict[str, Any], says(any="{at}: expected a JSON schema object.")] = _object(
        lambda: {"type": "object"}
    )
    type: Annotated[
        Literal["custom"] | None,
        Meta(description="Server tools are refused with a 400."),
        says(1, any="{param}: server tool type {value!r} is not supported."),
    ] = None


class AnthropicToolChoice(Struct):
    type: Annotated[
        Literal["auto", "any", "tool", "none"], says(1, any="tool_choice.type: expected auto, any, tool or none.")
    ]
    name: Annotated[
        str | None,
        Meta(description="The tool to call; with type tool."),
        says(1, any="tool_choice.name: {value!r} is not one of the tools."),
    ] = None
    disable_parallel_tool_use: bool | None = None


class AnthropicThinking(Struct):
    type: Annotated[
        Literal["enabled", "disabled", "adaptive"],
        says(1, any="thinking.type: expected enabled, adaptive or disabled."),
    ]
    budget_tokens: opt(
        integer(1), "With enabled: the most tokens the reasoning may take before the answer is started."
    ) = None


class AnthropicPrompt(Body, kw_only=True):
    """What the Messages endpoints share."""

    dots: ClassVar[bool] = True

    model: str
    messages: Annotated[
        list[Annotated[AnthropicMessage, says(type="{at}.role: expected 'user', 'assistant' or 'system'.")]],
        Meta(min_length=1),
        says(value="messages: at least one message is required."),
    ]
    system: opt(TextBlocks) = None
    tools: opt(list[Annotated[AnthropicTool, says(type="{at}: a tool needs a name.")]]) = None
    tool_choice: opt(AnthropicToolChoice) = None
    thinking: opt(AnthropicThinking, "Think before answering (the model's reasoning switch).") = None
    stop_sequences: Annotated[list[str] | None, says(inner="stop_sequences: expected an array of strings.")] = None
    temperature: opt(num(0, 1)) = 1.0
    top_p: opt(num(0, 1)) = 1.0
    top_k: opt(integer(0)) = 0
    seed: opt(integer(), "An extension: reproducible sampling, as in the OpenAI dialect.") = None
    metadata: opt(dict[str, Any], "Accepted and ignored.") = None


class AnthropicCountTokensRequest(AnthropicPrompt, kw_only=True):
    """POST /v1/messages/count_tokens: the prompt of a Messages request."""

    max_tokens: opt(integer(1)) = None


class AnthropicMessagesRequest(AnthropicPrompt, kw_only=True):
    """POST /v1/messages."""

    max_tokens: integer(1)
    stream: opt(bool) = False


# -- management --------------------------------------------------------------------------------------


class ModelName(Body, kw_only=True):
    """POST /models/load, unload, pin, unpin and evict: the model as ``model`` or ``model_id`` (one
    is required; both must agree)."""

    model: Annotated[str | None, Meta(description="A catalogue model id or alias.")] = None
    model_id: Annotated[str | None, Meta(description="The same as model (the name other servers use).")] = None


REQUESTS = (ChatCompletionRequest, CompletionRequest, AnthropicMessagesRequest, AnthropicCountTokensRequest, ModelName)

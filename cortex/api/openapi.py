"""GET /openapi.json: the OpenAPI 3.1 document of the whole HTTP API.

Written by hand, next to the resources it describes; tests/test_openapi.py checks it against the
routes the app registers and tests/test_fuzz.py sends requests generated from it to a real server.
Request schemas say what the server accepts (a field outside its range is a 400 naming it);
response schemas say what it sends. Shared shapes live once under ``components``.
"""

from __future__ import annotations

import json
from functools import cache

import falcon

import cortex

JSON = "application/json"
SSE = "text/event-stream"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _null(schema: dict) -> dict:
    """``schema`` or null: the server reads an explicit null as "not given"."""
    if "type" in schema and "$ref" not in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        return {**schema, "type": [*types, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def _obj(properties: dict, required: tuple[str, ...] = (), **extra) -> dict:
    out = {"type": "object", "properties": properties, **extra}
    if required:
        out["required"] = list(required)
    return out


def _const(value: str) -> dict:
    return {"type": "string", "const": value}


def _int(lo: int | None = None, hi: int | None = None, **extra) -> dict:
    out = {"type": "integer", **extra}
    if lo is not None:
        out["minimum"] = lo
    if hi is not None:
        out["maximum"] = hi
    return out


def _num(lo: float, hi: float, **extra) -> dict:
    return {"type": "number", "minimum": lo, "maximum": hi, **extra}


STR = {"type": "string"}
BOOL = {"type": "boolean"}
INT = {"type": "integer"}
OBJ = {"type": "object"}  # any JSON object (a JSON Schema, template kwargs, tool input)
TOKEN_ID = _int(0)
INT64 = _int(-(2**63), 2**63 - 1)


# -- shared request pieces ---------------------------------------------------------------------------

SAMPLING = _obj(
    {
        "max_tokens": _null(_int(1, description="Most tokens to generate per choice; default: up to the context.")),
        "temperature": _null(_num(0, 2, default=1)),
        "top_p": _null(_num(0, 1, default=1)),
        "top_k": _null(_int(0, default=0, description="0 disables top-k.")),
        "min_p": _null(_num(0, 1, default=0)),
        "seed": _null({**INT64, "description": "Same seed, same output, whatever else is batched with it."}),
        "presence_penalty": _null(_num(-2, 2, default=0)),
        "frequency_penalty": _null(_num(-2, 2, default=0)),
        "repetition_penalty": _null(_num(0.01, 10, default=1)),
        "stop": _null(
            {
                "oneOf": [STR, {"type": "array", "items": STR, "maxItems": 4}],
                "description": "Text that ends a choice; it is not included in the output.",
            }
        ),
        "stop_token_ids": _null({"type": "array", "items": TOKEN_ID}),
        "logit_bias": _null(
            {
                "type": "object",
                "propertyNames": {"pattern": "^[0-9]+$"},
                "additionalProperties": _num(-100, 100),
                "description": "Token id (as a string) to a bias added to its logit.",
            }
        ),
        "n": _null(_int(1, 16, default=1, description="Choices generated from the one prompt.")),
        "stream": _null({**BOOL, "default": False}),
        "stream_options": _null(_obj({"include_usage": BOOL})),
        "ignore_eos": _null({**BOOL, "default": False, "description": "Keep generating past end-of-sequence."}),
    },
    description="Sampling and length fields shared by the OpenAI endpoints.",
)

TEXT_PART = _obj({"type": _const("text"), "text": STR}, ("type", "text"))
CONTENT = {
    "oneOf": [STR, {"type": "array", "items": _ref("TextPart")}],
    "description": "A string, or an array of text parts (other part types are refused with a 400).",
}
TOOL_CALL = _obj(
    {
        "id": STR,
        "type": _const("function"),
        "function": _obj({"name": STR, "arguments": {**STR, "description": "JSON-encoded arguments."}}),
    },
    ("id", "type", "function"),
)


TOOL_CALL_IN = _obj(
    {
        "id": STR,
        "type": _const("function"),
        "function": _obj(
            {"name": STR, "arguments": {"anyOf": [STR, OBJ], "description": "A JSON object, or one JSON-encoded."}},
            ("name",),
        ),
    },
    ("function",),
)


def _message(roles: list[str], required: tuple[str, ...] = ("role", "content"), **more) -> dict:
    role = _const(roles[0]) if len(roles) == 1 else {"type": "string", "enum": roles}
    return _obj({"role": role, "content": CONTENT, "name": STR, **more}, required)


CHAT_MESSAGE = {
    "oneOf": [
        _message(["system", "developer"]),
        _message(["user"]),
        _message(
            ["assistant"],
            ("role",),
            content=_null(CONTENT),
            tool_calls=_null({"type": "array", "items": TOOL_CALL_IN}),
            reasoning_content=_null(STR),
        ),
        _message(["tool"], ("role", "content", "tool_call_id"), tool_call_id=STR),
    ],
}

CHAT_REQUEST = {
    "allOf": [_ref("SamplingOptions")],
    **_obj(
        {
            "model": {**STR, "description": "A catalogue model id or alias (GET /v1/models)."},
            "messages": {"type": "array", "items": _ref("ChatMessage"), "minItems": 1},
            "max_completion_tokens": _null(_int(1, description="Takes precedence over max_tokens.")),
            "logprobs": _null({**BOOL, "default": False}),
            "top_logprobs": _null(_int(0, 20, description="Requires logprobs: true.")),
            "tools": _null(
                {
                    "type": "array",
                    "items": _obj(
                        {
                            "type": _const("function"),
                            "function": _obj(
                                {"name": STR, "description": STR, "parameters": OBJ, "strict": _null(BOOL)}, ("name",)
                            ),
                        },
                        ("type", "function"),
                    ),
                }
            ),
            "tool_choice": _null(
                {
                    "oneOf": [
                        {"type": "string", "enum": ["none", "auto", "required"]},
                        _obj(
                            {"type": _const("function"), "function": _obj({"name": STR}, ("name",))},
                            ("type", "function"),
                        ),
                    ]
                }
            ),
            "parallel_tool_calls": _null(BOOL),
            "response_format": _null(
                {
                    "oneOf": [
                        _obj({"type": _const("text")}, ("type",)),
                        _obj({"type": _const("json_object")}, ("type",)),
                        _obj(
                            {
                                "type": _const("json_schema"),
                                "json_schema": _obj(
                                    {"name": STR, "description": STR, "schema": OBJ, "strict": _null(BOOL)}, ("name",)
                                ),
                            },
                            ("type", "json_schema"),
                        ),
                    ]
                }
            ),
            "reasoning_effort": _null({"type": "string", "enum": ["none", "minimal", "low", "medium", "high"]}),
            "chat_template_kwargs": _null(
                {**OBJ, "description": "Extra variables for the chat template, e.g. enable_thinking."}
            ),
        },
        ("model", "messages"),
    ),
}

COMPLETION_REQUEST = {
    "allOf": [_ref("SamplingOptions")],
    **_obj(
        {
            "model": STR,
            "prompt": {
                "oneOf": [
                    STR,
                    {"type": "array", "items": TOKEN_ID, "minItems": 1},
                    {"type": "array", "items": STR, "minItems": 1, "maxItems": 1},
                    {"type": "array", "items": {"type": "array", "items": TOKEN_ID, "minItems": 1}, "maxItems": 1},
                ],
                "description": "Text or token ids; a batch may hold one prompt (several are refused with a 400).",
            },
            "max_tokens": _null(_int(1, default=16)),
            "echo": _null({**BOOL, "default": False, "description": "Prepend the prompt: a text one, not streamed."}),
            "logprobs": _null(_int(0, 5, description="Report logprobs, with this many alternatives per token.")),
            "best_of": _null({"type": "integer", "const": 1, "description": "Not supported beyond 1."}),
            "suffix": {"type": "null", "description": "Not supported."},
        },
        ("model", "prompt"),
    ),
}

# -- Anthropic request pieces ------------------------------------------------------------------------

A_TEXT = _obj({"type": _const("text"), "text": STR}, ("type", "text"))
A_TOOL_USE = _obj({"type": _const("tool_use"), "id": STR, "name": STR, "input": OBJ}, ("type", "id", "name", "input"))
A_THINKING = _obj({"type": _const("thinking"), "thinking": STR, "signature": STR}, ("type", "thinking"))
A_USER_BLOCK = {
    "oneOf": [
        _ref("AnthropicTextBlock"),
        _obj(
            {
                "type": _const("tool_result"),
                "tool_use_id": STR,
                "content": {"oneOf": [STR, {"type": "array", "items": _ref("AnthropicTextBlock")}]},
                "is_error": BOOL,
            },
            ("type", "tool_use_id"),
        ),
        _obj(
            {"type": {"type": "string", "enum": ["image", "document"]}, "source": OBJ},
            ("type", "source"),
            description="Refused with a 400: no model here reads images or documents.",
        ),
    ]
}
A_ASSISTANT_BLOCK = {
    "oneOf": [
        _ref("AnthropicTextBlock"),
        _ref("AnthropicToolUseBlock"),
        _ref("AnthropicThinkingBlock"),
        _obj({"type": _const("redacted_thinking"), "data": STR}, ("type",), description="Dropped."),
    ]
}


def _turn(role: str, block: dict) -> dict:
    return _obj(
        {"role": _const(role), "content": {"oneOf": [STR, {"type": "array", "items": block}]}}, ("role", "content")
    )


A_MESSAGE = {"oneOf": [_turn("user", A_USER_BLOCK), _turn("assistant", A_ASSISTANT_BLOCK)]}
A_PROMPT = {
    "model": STR,
    "messages": {"type": "array", "items": _ref("AnthropicMessage"), "minItems": 1},
    "system": {"oneOf": [STR, {"type": "array", "items": _ref("AnthropicTextBlock")}]},
    "tools": {
        "type": "array",
        "items": _obj(
            {
                "name": {"type": "string", "minLength": 1},
                "description": STR,
                "input_schema": OBJ,
                "type": _null({**_const("custom"), "description": "Server tools are refused with a 400."}),
            },
            ("name",),
        ),
    },
    "tool_choice": _obj(
        {
            "type": {"type": "string", "enum": ["auto", "any", "tool", "none"]},
            "name": {**STR, "description": "The tool to call; with type tool."},
            "disable_parallel_tool_use": BOOL,
        },
        ("type",),
    ),
    "thinking": {
        "oneOf": [
            _obj({"type": {"type": "string", "enum": ["enabled", "adaptive"]}, "budget_tokens": _int(1)}, ("type",)),
            _obj({"type": _const("disabled")}, ("type",)),
        ]
    },
}
A_REQUEST = _obj(
    {
        **A_PROMPT,
        "max_tokens": _int(1),
        "stop_sequences": {"type": "array", "items": STR},
        "stream": BOOL,
        "temperature": _num(0, 1, default=1),
        "top_p": _num(0, 1),
        "top_k": _int(0),
        "metadata": _obj({"user_id": _null(STR)}),
    },
    ("model", "max_tokens", "messages"),
)

# -- responses ---------------------------------------------------------------------------------------

TOKEN_LOGPROB = _obj({"token": STR, "logprob": {"type": "number"}, "bytes": _null({"type": "array", "items": INT})})
USAGE = _obj(
    {
        "prompt_tokens": INT,
        "completion_tokens": INT,
        "total_tokens": INT,
        "prompt_tokens_details": _obj({"cached_tokens": {**INT, "description": "Prompt tokens served from cache."}}),
    },
    ("prompt_tokens", "completion_tokens", "total_tokens"),
)
FINISH = {"type": "string", "enum": ["stop", "length", "tool_calls"]}
CHOICE_LOGPROBS = _null(
    _obj(
        {
            "content": {
                "type": "array",
                "items": {
                    "allOf": [_ref("TokenLogprob")],
                    **_obj({"top_logprobs": {"type": "array", "items": _ref("TokenLogprob")}}),
                },
            }
        }
    )
)
ASSISTANT_OUT = {
    "content": _null(STR),
    "reasoning_content": _null({**STR, "description": "The model's thinking, when it thinks."}),
    "tool_calls": {"type": "array", "items": _ref("ToolCall")},
}
HEAD = {"id": STR, "created": {**INT, "description": "Unix seconds."}, "model": STR}
CHAT_COMPLETION = _obj(
    {
        **HEAD,
        "object": _const("chat.completion"),
        "choices": {
            "type": "array",
            "items": _obj(
                {
                    "index": INT,
                    "message": _obj({"role": _const("assistant"), **ASSISTANT_OUT}, ("role", "content")),
                    "logprobs": CHOICE_LOGPROBS,
                    "finish_reason": FINISH,
                },
                ("index", "message", "finish_reason"),
            ),
        },
        "usage": _ref("Usage"),
    },
    ("id", "object", "created", "model", "choices", "usage"),
)
TOOL_CALL_DELTA = _obj(
    {"index": INT, "id": STR, "type": _const("function"), "function": _obj({"name": STR, "arguments": STR})},
    ("index",),
)
CHAT_CHUNK = _obj(
    {
        **HEAD,
        "object": _const("chat.completion.chunk"),
        "choices": {
            "type": "array",
            "items": _obj(
                {
                    "index": INT,
                    "delta": _obj(
                        {
                            "role": _const("assistant"),
                            **ASSISTANT_OUT,
                            "tool_calls": {"type": "array", "items": TOOL_CALL_DELTA},
                        }
                    ),
                    "logprobs": CHOICE_LOGPROBS,
                    "finish_reason": _null(FINISH),
                },
                ("index", "delta"),
            ),
        },
        "usage": _null(_ref("Usage")),
    },
    ("id", "object", "created", "model", "choices"),
    description="One SSE `data:` line; the last choice chunk is followed (with stream_options.include_usage) "
    "by a chunk with empty choices and usage, then `data: [DONE]`. An error mid-stream is sent as one "
    "`data:` line holding the OpenAI error object.",
)
TEXT_COMPLETION = _obj(
    {
        **HEAD,
        "object": _const("text_completion"),
        "choices": {
            "type": "array",
            "items": _obj(
                {
                    "index": INT,
                    "text": STR,
                    "logprobs": _null(
                        _obj(
                            {
                                "tokens": {"type": "array", "items": STR},
                                "token_logprobs": {"type": "array", "items": {"type": "number"}},
                                "top_logprobs": _null(
                                    {
                                        "type": "array",
                                        "items": {"type": "object", "additionalProperties": {"type": "number"}},
                                    }
                                ),
                                "text_offset": {"type": "array", "items": INT},
                            }
                        )
                    ),
                    "finish_reason": _null(FINISH),
                },
                ("index", "text", "finish_reason"),
            ),
        },
        "usage": _null(_ref("Usage")),
    },
    ("id", "object", "created", "model", "choices"),
    description="The response, and (streamed) each SSE `data:` line before `data: [DONE]`.",
)

MODEL_STATE = _obj(
    {
        "id": STR,
        "status": {"type": "string", "enum": ["unloaded", "loading", "loaded", "recovering", "failed"]},
        "devices": {"type": "array", "items": STR},
        "tensor_parallel": INT,
        "context_length": _null(INT),
        "param_bytes": INT,
        "rank_bytes": {"type": "array", "items": INT},
        "size_bytes": {**INT, "description": "Bytes per device: weights (measured once loaded) and KV pool."},
        "pinned": {**BOOL, "description": "Never evicted (the catalogue's `pinned`, or a pin operation)."},
        "residency_priority": INT,
        "loads": INT,
        "load_seconds": {"type": "number"},
        "evictions": INT,
        "idle_s": _null({"type": "number", "description": "Seconds since it was last used."}),
        "in_flight": INT,
        "queued": {**INT, "description": "Requests queued or waiting for it to load."},
        "error": _null(STR),
        "engine": _obj(
            {
                **{
                    k: INT
                    for k in (
                        "running",
                        "waiting",
                        "preemptions",
                        "kv_blocks_total",
                        "kv_blocks_used",
                        "kv_block_size",
                        "kv_blocks_cached",
                    )
                },
                "kv_dtype": _null({**STR, "description": "What the KV pool holds: float32, float16 or bfloat16."}),
            },
            description="Scheduler and KV cache counters, while loaded.",
        ),
    },
    ("id", "status", "devices"),
)
NAMES = {"type": "array", "items": STR}
MODEL = _obj(
    {
        "id": STR,
        "object": _const("model"),
        "created": {**INT, "description": "0: the same on every leader of the fleet."},
        "owned_by": {**STR, "description": "Always cortex: the fleet, whichever leader answers."},
        "status": {
            **MODEL_STATE["properties"]["status"],
            "description": "Its best status on any node: loaded when resident somewhere.",
        },
        "context_length": _null({**INT, "description": "The smallest any node reports."}),
        "devices": {**NAMES, "description": "The devices holding it, node by node in resident_on order."},
        "resident_on": {**NAMES, "description": "Nodes where it is loaded now."},
        "loadable_on": {**NAMES, "description": "Other nodes that could load it."},
        "locations": {
            "type": "array",
            "items": _obj({"node": STR, "status": MODEL_STATE["properties"]["status"], "devices": NAMES}),
        },
        "alias_for": {**STR, "description": "Set on an alias: the model it names."},
    },
    ("id", "object", "created", "owned_by", "resident_on", "loadable_on"),
)
FLEET = _obj(
    {
        "node": {**STR, "description": "The leader that answered."},
        "status": {"type": "string", "enum": ["ok", "degraded", "isolated"]},
        "nodes": {
            "type": "array",
            "items": _obj(
                {
                    "name": STR,
                    "endpoint": STR,
                    "self": BOOL,
                    "up": BOOL,
                    "cooling": BOOL,
                    "status": _null(STR),
                    "draining": BOOL,
                    "devices": {"type": "array", "items": {"type": "object"}},
                    "requests": {"type": "object"},
                    "error": _null(STR),
                }
            ),
        },
        "models": {"type": "array", "items": _ref("Model")},
    },
    ("node", "status", "nodes", "models"),
)
HEALTH = _obj(
    {
        "status": {"type": "string", "enum": ["ok", "loading", "degraded", "draining", "down"]},
        "draining": {**BOOL, "description": "New requests are refused (cortex-admin drain, or shutting down)."},
        "node": STR,
        "uptime_s": {"type": "number"},
        "pid": INT,
        "workers": {
            "type": "array",
            "items": _obj(
                {
                    "rank": INT,
                    "device": STR,
                    "pid": _null(INT),
                    "alive": BOOL,
                    "ready": BOOL,
                    "restarts": INT,
                    "last_exit": _null({**STR, "description": "How its last process ended, if it restarted."}),
                }
            ),
        },
        "models": {"type": "array", "items": _ref("ModelState")},
        "devices": {
            "type": "array",
            "items": _obj(
                {
                    "rank": INT,
                    "device": STR,
                    "budget_bytes": _null({**INT, "description": "Bytes models may use; null: not accounted."}),
                    "used_bytes": INT,
                    "free_bytes": _null(INT),
                    "evictable_bytes": {**INT, "description": "Held by idle, unpinned models."},
                    "load_unload_cycles": {**INT, "description": "Since its worker (re)started."},
                }
            ),
        },
        "eviction": _obj(
            {
                "strategy": {"type": "string", "enum": ["lru", "priority"]},
                "evictions": {"type": "object", "additionalProperties": INT, "description": "By reason."},
                "defrag_restarts": INT,
                "loads_cancelled": INT,
                "loads": INT,
            }
        ),
        "requests": _obj({"running": INT, "waiting": INT}),
        "error": {**STR, "description": "With status down: why."},
    },
    ("status",),
)

A_USAGE = _obj(
    {
        "input_tokens": {**INT, "description": "Prompt tokens not served from cache."},
        "output_tokens": INT,
        "cache_read_input_tokens": INT,
        "cache_creation_input_tokens": INT,
    },
    ("input_tokens", "output_tokens"),
)
A_OUT_BLOCK = {"oneOf": [_ref("AnthropicTextBlock"), _ref("AnthropicToolUseBlock"), _ref("AnthropicThinkingBlock")]}
STOP_REASON = {"type": "string", "enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use"]}
A_MESSAGE_OUT = _obj(
    {
        "id": STR,
        "type": _const("message"),
        "role": _const("assistant"),
        "model": STR,
        "content": {"type": "array", "items": A_OUT_BLOCK},
        "stop_reason": _null(STOP_REASON),
        "stop_sequence": _null(STR),
        "usage": _ref("AnthropicUsage"),
    },
    ("id", "type", "role", "model", "content", "stop_reason", "usage"),
)
A_DELTA = {
    "oneOf": [
        _obj({"type": _const("text_delta"), "text": STR}, ("type", "text")),
        _obj({"type": _const("input_json_delta"), "partial_json": STR}, ("type", "partial_json")),
        _obj({"type": _const("thinking_delta"), "thinking": STR}, ("type", "thinking")),
        _obj({"type": _const("signature_delta"), "signature": STR}, ("type", "signature")),
    ]
}
A_EVENT = {
    "oneOf": [
        _obj({"type": _const("message_start"), "message": _ref("AnthropicMessageResponse")}, ("type", "message")),
        _obj(
            {"type": _const("content_block_start"), "index": INT, "content_block": A_OUT_BLOCK},
            ("type", "index", "content_block"),
        ),
        _obj({"type": _const("content_block_delta"), "index": INT, "delta": A_DELTA}, ("type", "index", "delta")),
        _obj({"type": _const("content_block_stop"), "index": INT}, ("type", "index")),
        _obj(
            {
                "type": _const("message_delta"),
                "delta": _obj({"stop_reason": STOP_REASON, "stop_sequence": _null(STR)}),
                "usage": _ref("AnthropicUsage"),
            },
            ("type", "delta"),
        ),
        _obj({"type": _const("message_stop")}, ("type",)),
        _obj({"type": _const("ping")}, ("type",)),
    ],
    "description": "The `data:` of one SSE event; its `event:` line names the same type (or error).",
}

OPENAI_ERROR = _obj(
    {
        "error": _obj(
            {
                "message": STR,
                "type": {**STR, "examples": ["invalid_request_error", "service_unavailable", "rate_limit_error"]},
                "param": _null({**STR, "description": "The request field at fault."}),
                "code": _null({**STR, "examples": ["model_not_found", "context_length_exceeded", "model_loading"]}),
            },
            ("message", "type", "param", "code"),
        )
    },
    ("error",),
)
ANTHROPIC_ERROR = _obj(
    {
        "type": _const("error"),
        "error": _obj(
            {
                "type": {
                    "type": "string",
                    "examples": ["invalid_request_error", "not_found_error", "overloaded_error", "api_error"],
                },
                "message": STR,
            },
            ("type", "message"),
        ),
    },
    ("type", "error"),
)

SCHEMAS = {
    "SamplingOptions": SAMPLING,
    "TextPart": TEXT_PART,
    "ToolCall": TOOL_CALL,
    "ChatMessage": CHAT_MESSAGE,
    "ChatCompletionRequest": CHAT_REQUEST,
    "ChatCompletion": CHAT_COMPLETION,
    "ChatCompletionChunk": CHAT_CHUNK,
    "CompletionRequest": COMPLETION_REQUEST,
    "TextCompletion": TEXT_COMPLETION,
    "TokenLogprob": TOKEN_LOGPROB,
    "Usage": USAGE,
    "Model": MODEL,
    "ModelList": _obj(
        {"object": _const("list"), "data": {"type": "array", "items": _ref("Model")}}, ("object", "data")
    ),
    "ModelState": MODEL_STATE,
    "ModelName": _obj({"model": {**STR, "description": "A catalogue model id or alias."}}, ("model",)),
    "Health": HEALTH,
    "Fleet": FLEET,
    "AnthropicTextBlock": A_TEXT,
    "AnthropicToolUseBlock": A_TOOL_USE,
    "AnthropicThinkingBlock": A_THINKING,
    "AnthropicMessage": A_MESSAGE,
    "AnthropicMessagesRequest": A_REQUEST,
    "AnthropicCountTokensRequest": {**A_REQUEST, "required": ["model", "messages"]},
    "AnthropicMessageResponse": A_MESSAGE_OUT,
    "AnthropicUsage": A_USAGE,
    "AnthropicStreamEvent": A_EVENT,
    "OpenAIError": OPENAI_ERROR,
    "AnthropicError": ANTHROPIC_ERROR,
}

# -- responses and operations ------------------------------------------------------------------------

STATUS_TEXT = {
    400: "Malformed JSON, or a missing, mistyped or out-of-range field (named in param), or a prompt "
    "longer than the model's context.",
    401: "API keys are configured and the request carries none of them.",
    403: "The management API needs an admin key; this is an API key.",
    404: "Unknown model.",
    409: "The model is busy (requests in flight, or loading).",
    413: "The request body is larger than the configured limit.",
    429: "Too many requests in flight from this client.",
    503: "The model is loading or recovering, the queue is full, or the engine is not answering.",
    504: "The operation did not finish in time.",
    507: "The model is larger than a device's whole memory budget.",
}
RETRY_AFTER = {
    "description": "Seconds to wait before trying again.",
    "required": True,
    "schema": _int(0),
}


def _error_responses(dialect: str) -> dict:
    schema = "OpenAIError" if dialect == "OpenAI" else "AnthropicError"
    out = {}
    for status, text in STATUS_TEXT.items():
        r = {"description": text, "content": {JSON: {"schema": _ref(schema)}}}
        if status == 503:
            r["headers"] = {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}
        out[f"{dialect}{status}"] = r
    return out


def _errors(dialect: str, *statuses: int) -> dict:
    return {str(s): {"$ref": f"#/components/responses/{dialect}{s}"} for s in statuses}


def _body(schema: str) -> dict:
    return {"required": True, "content": {JSON: {"schema": _ref(schema)}}}


def _sse_event(data: str, error: str, done: bool) -> dict:
    """One server-sent event (the schema of each, as schemathesis and OpenAPI 3.2's itemSchema read it):
    ``data`` is JSON of the ``data`` schema, or an error object, or (OpenAI) the final ``[DONE]``."""
    json_data = {
        "type": "string",
        "contentMediaType": JSON,
        "contentSchema": {"anyOf": [_ref(data), _ref(error)]},
    }
    return _obj(
        {"event": STR, "id": STR, "data": {"anyOf": [_const("[DONE]"), json_data]} if done else json_data},
        ("data",),
    )


def _ok(description: str, schema: dict | str, stream: dict | None = None) -> dict:
    content = {JSON: {"schema": _ref(schema) if isinstance(schema, str) else schema}}
    if stream:
        content[SSE] = {"schema": stream}
    return {"200": {"description": description, "content": content}}


def _op(op_id: str, tag: str, summary: str, responses: dict, **more) -> dict:
    return {"operationId": op_id, "tags": [tag], "summary": summary, "responses": responses, **more}


CHAT_EVENT = _sse_event("ChatCompletionChunk", "OpenAIError", done=True)
TEXT_EVENT = _sse_event("TextCompletion", "OpenAIError", done=True)
ANTHROPIC_EVENT = _sse_event("AnthropicStreamEvent", "AnthropicError", done=False)
GENERATE = ("OpenAI", 400, 401, 404, 413, 429, 503)
A_GENERATE = ("Anthropic", 400, 401, 404, 413, 429, 503)
ANTHROPIC_VERSION = {
    "name": "anthropic-version",
    "in": "header",
    "required": False,
    "description": "Accepted and ignored: one version of the Messages API is served.",
    "schema": {"type": "string", "examples": ["2023-06-01"]},
}
PUBLIC: list = []  # no key needed, whatever keys are configured

PATHS = {
    "/v1/chat/completions": {
        "post": _op(
            "createChatCompletion",
            "OpenAI",
            "Chat completion; with stream: true, a text/event-stream of chat.completion.chunk.",
            {**_ok("The completion.", "ChatCompletion", CHAT_EVENT), **_errors(*GENERATE)},
            requestBody=_body("ChatCompletionRequest"),
        )
    },
    "/v1/completions": {
        "post": _op(
            "createCompletion",
            "OpenAI",
            "Legacy text completion of a raw prompt (no chat template).",
            {**_ok("The completion.", "TextCompletion", TEXT_EVENT), **_errors(*GENERATE)},
            requestBody=_body("CompletionRequest"),
        )
    },
    "/v1/models": {
        "get": _op(
            "listModels",
            "OpenAI",
            "Every model and alias the fleet can serve, where it is resident and where it could be loaded;"
            " the same on every leader once its peers are polled.",
            {**_ok("The models.", "ModelList"), **_errors("OpenAI", 401, 503)},
        )
    },
    "/v1/models/{model_id}": {
        "get": _op(
            "retrieveModel",
            "OpenAI",
            "One model or alias.",
            {**_ok("The model.", "Model"), **_errors("OpenAI", 401, 404, 503)},
            parameters=[{"name": "model_id", "in": "path", "required": True, "schema": STR}],
        )
    },
    "/v1/messages": {
        "post": _op(
            "createMessage",
            "Anthropic",
            "Anthropic Messages; with stream: true, the Anthropic server-sent event stream.",
            {**_ok("The message.", "AnthropicMessageResponse", ANTHROPIC_EVENT), **_errors(*A_GENERATE)},
            requestBody=_body("AnthropicMessagesRequest"),
            parameters=[ANTHROPIC_VERSION],
        )
    },
    "/v1/messages/count_tokens": {
        "post": _op(
            "countMessageTokens",
            "Anthropic",
            "Prompt tokens a Messages request would use, with the model's chat template.",
            {
                **_ok("The count.", _obj({"input_tokens": INT}, ("input_tokens",))),
                **_errors("Anthropic", 400, 401, 404, 413, 503),
            },
            requestBody=_body("AnthropicCountTokensRequest"),
            parameters=[ANTHROPIC_VERSION],
        )
    },
    "/health": {
        "get": _op(
            "health",
            "Operations",
            "Workers and models as the leader sees them; 200 only when serving. No key needed (open_paths).",
            {
                **_ok("Serving (status ok).", "Health"),
                "503": {
                    "description": "Loading, degraded, or the engine is down (status says which).",
                    "content": {JSON: {"schema": _ref("Health")}},
                },
            },
            security=PUBLIC,
        )
    },
    "/fleet": {
        "get": _op(
            "fleet",
            "Operations",
            "The fleet as this leader sees it: every node (up or down, devices and memory) and every"
            " model's locations. What `cortex status` shows.",
            {**_ok("The fleet.", "Fleet"), **_errors("OpenAI", 401, 503)},
        )
    },
    "/models": {
        "get": _op(
            "modelTable",
            "Operations",
            "Every catalogue model with its status, placement and engine counters, and the aliases.",
            {
                **_ok(
                    "The catalogue.",
                    _obj(
                        {
                            "models": {"type": "array", "items": _ref("ModelState")},
                            "aliases": {"type": "object", "additionalProperties": STR},
                        },
                        ("models", "aliases"),
                    ),
                ),
                **_errors("OpenAI", 401, 403, 503),
            },
        )
    },
    **{
        f"/models/{op}": {
            "post": _op(
                f"{op}Model",
                "Operations",
                summary,
                {
                    **_ok("The model's state afterwards.", _obj({"model": _ref("ModelState")}, ("model",))),
                    **_errors("OpenAI", 400, 401, 403, 404, 409, 413, 503, 504, *((507,) if op == "load" else ())),
                },
                requestBody=_body("ModelName"),
            )
        }
        for op, summary in (
            ("load", "Load a model and wait for it; concurrent loads of one model share the one load."),
            ("unload", "Unload a model; refused (409) while it has requests in flight."),
            ("pin", "Pin a loaded or unloaded model: never evicted (until unpinned or restarted)."),
            ("unpin", "Unpin a model: eviction may take it again."),
            ("evict", "Evict a loaded, idle, unpinned model now (counted as reason admin)."),
        )
    },
    "/openapi.json": {
        "get": _op(
            "openapi",
            "Operations",
            "This document.",
            {"200": {"description": "OpenAPI 3.1", "content": {JSON: {"schema": OBJ}}}, **_errors("OpenAI", 401)},
        )
    },
}


@cache
def _document_json() -> str:
    doc = {
        "openapi": "3.1.0",
        "info": {
            "title": "cortex",
            "version": cortex.__version__,
            "summary": "OpenAI and Anthropic compatible inference API of one cortex node.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [
            {"name": "OpenAI", "description": "OpenAI dialect; errors in the OpenAI envelope."},
            {"name": "Anthropic", "description": "Anthropic dialect; errors in the Anthropic envelope."},
            {"name": "Operations", "description": "Health and model management; OpenAI error envelope."},
        ],
        # keys are optional: with none configured every request is served
        "security": [{}, {"bearer": []}, {"apiKey": []}],
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "responses": {**_error_responses("OpenAI"), **_error_responses("Anthropic")},
            "headers": {"RetryAfter": RETRY_AFTER},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>."},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
    }
    return json.dumps(doc, separators=(",", ":"))


def document() -> dict:
    """The OpenAPI 3.1 document (a fresh copy: callers may change it)."""
    return json.loads(_document_json())


class OpenApiDocument:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.text = _document_json()

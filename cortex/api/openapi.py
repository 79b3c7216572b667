"""GET /openapi.json: the OpenAPI 3.1 document of the whole HTTP API.

The schemas are not written here: msgspec makes them from the types the server decodes requests
into (``cortex.api.bodies``) and the types that describe its answers (``cortex.api.replies``), so a
range or enum is declared once. This module holds the operations: paths, statuses and headers.
tests/test_openapi.py checks the document against the routes the app registers and
tests/test_fuzz.py sends requests generated from it to a real server.
"""

from __future__ import annotations

import json
from functools import cache

import falcon
import msgspec

import cortex
from cortex.api.bodies import REQUESTS
from cortex.api.embeddings import schemas as embedding_schemas
from cortex.api.rawbody import MAX_JSON_DEPTH
from cortex.api.replies import REPLIES, AnthropicStreamEvent
from cortex.api.responses import ResponsesRequest

JSON = "application/json"
SSE = "text/event-stream"
REF = "#/components/schemas/{name}"


def _ref(name: str) -> dict:
    return {"$ref": REF.format(name=name)}


def _obj(properties: dict, required: tuple[str, ...] = (), **extra) -> dict:
    out = {"type": "object", "properties": properties, **extra}
    if required:
        out["required"] = list(required)
    return out


def _const(value: str) -> dict:
    return {"type": "string", "const": value}


STR = {"type": "string"}
OBJ = {"type": "object"}


def schemas() -> dict:
    """Every component schema, made from the declared types."""
    (*_, events), components = msgspec.json.schema_components(
        (*REQUESTS, ResponsesRequest, *REPLIES, AnthropicStreamEvent), ref_template=REF
    )
    for schema in components.values():
        schema.pop("title", None)  # the component's name
        if schema.get("required") == []:
            del schema["required"]
    # one of the two names is required (cortex/api/manage.py), which a type cannot say
    components["ModelName"]["anyOf"] = [
        {"required": [name], "properties": {name: STR}} for name in ("model", "model_id")
    ]
    components.update(embedding_schemas(REF))  # POST /v1/embeddings (cortex/api/embeddings.py)
    return {**components, "AnthropicStreamEvent": events}


# -- responses and operations ------------------------------------------------------------------------

STATUS_TEXT = {
    400: f"Malformed JSON (or nested deeper than {MAX_JSON_DEPTH} levels, or a lone surrogate in a string), "
    "or a missing, mistyped or out-of-range field (named in param), or a prompt longer than the model's context.",
    401: "API keys are configured and the request carries none of them.",
    403: "The management API needs an admin key; this is an API key.",
    404: "Unknown model.",
    409: "The model is busy (requests in flight, or loading).",
    413: "The request body (stated length, or chunked) is larger than the configured limit.",
    429: "Too many requests in flight from this client.",
    503: "The model is loading or recovering, the queue is full, or the engine is not answering.",
    504: "The operation did not finish in time.",
    507: "The model is larger than a device's whole memory budget.",
}
RETRY_AFTER = {
    "description": "Seconds to wait before trying again.",
    "required": True,
    "schema": {"type": "integer", "minimum": 0},
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
STORED_RESPONSE = {
    "type": "object",
    "properties": {"object": _const("response"), "id": STR, "output": {"type": "array"}},
}
RESPONSE_ID = {"name": "response_id", "in": "path", "required": True, "schema": STR}
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
    "/v1/responses": {
        "post": _op(
            "createResponse",
            "OpenAI",
            "The Responses API: input items and function tools in, output items (reasoning, message,"
            " function calls) out. Unless store is false, the response and its conversation are kept"
            " (bounded: [gateway] responses_store_max, responses_store_ttl_s) and previous_response_id continues"
            " it (400 when unknown or expired).",
            {
                **_ok(
                    "The response (streamed: response.* events, then response.completed or response.incomplete).",
                    {
                        "type": "object",
                        "properties": {"object": _const("response"), "id": STR, "output": {"type": "array"}},
                    },
                ),
                **_errors(*GENERATE),
            },
            requestBody=_body("ResponsesRequest"),
        )
    },
    "/v1/responses/{response_id}": {
        "get": _op(
            "getResponse",
            "OpenAI",
            "A stored response object, as POST /v1/responses answered it; 404 when unknown or expired.",
            {**_ok("The response.", STORED_RESPONSE), **_errors("OpenAI", 401, 404)},
            parameters=[RESPONSE_ID],
        ),
        "delete": _op(
            "deleteResponse",
            "OpenAI",
            "Removes a stored response; 404 when unknown or expired.",
            {
                **_ok(
                    "Deleted.",
                    _obj(
                        {"id": STR, "object": _const("response"), "deleted": _const(True)}, ("id", "object", "deleted")
                    ),
                ),
                **_errors("OpenAI", 401, 404),
            },
            parameters=[RESPONSE_ID],
        ),
    },
    "/v1/embeddings": {
        "post": _op(
            "createEmbedding",
            "OpenAI",
            "Embeddings: per input, the model's last-token hidden state after its final norm, L2-normalised"
            " (no chat template); dimensions truncates and normalises again.",
            {**_ok("One vector per input, in input order.", "EmbeddingList"), **_errors(*GENERATE)},
            requestBody=_body("EmbeddingRequest"),
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
                **_ok("The count.", "TokenCount"),
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
            "Readiness: workers and models as the leader sees them; 200 while serving (ok, or degraded: "
            "something is broken but the rest serves). No key needed (open_paths).",
            {
                **_ok("Serving (status ok or degraded).", "Health"),
                "503": {
                    "description": "Loading, draining, or the engine is down (status says which).",
                    "content": {JSON: {"schema": _ref("Health")}},
                },
            },
            security=PUBLIC,
        )
    },
    "/health/live": {
        "get": _op(
            "liveness",
            "Operations",
            "Liveness: this front process answers (the leader is not asked). Never needs a key.",
            _ok("Alive.", {"type": "object", "properties": {"status": {"type": "string", "const": "live"}}}),
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
                **_ok("The catalogue.", "ModelTable"),
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
                    **_ok("The model's state afterwards.", "ModelOpResult"),
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
            "schemas": schemas(),
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

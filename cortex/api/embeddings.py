"""OpenAI dialect: POST /v1/embeddings, what editors and RAG tools call for code and document search.

An embedding here comes from the decoder LM cortex serves: each input is tokenized with the model's
tokenizer as it is (no chat template), run through the model without sampling, and its last
token's hidden state after the model's final norm is the vector (last-token pooling, the convention
of decoder embedding models such as Qwen3-Embedding), L2-normalised. Any catalogue model serves
them; an embedding model gives the useful ones. The model loads on demand, as for chat.

``dimensions`` (text-embedding-3's field) keeps the vector's first that many features and
L2-normalises them again (what OpenAI's text-embedding-3 models do; meaningful for models trained
for it, Matryoshka style); more than the model's hidden size is a 400. ``encoding_format``
``base64`` is each vector's little-endian float32 bytes, base64-encoded. ``user`` is ignored.

The leader (``rpc.engine.Embed``, cortex/leader/embedding.py) tokenizes, checks each input against
the model's context (a 400 naming the input) and runs the inputs in batches between the model's
generation steps, so running streams go on; this resource renders its vectors.
"""

from __future__ import annotations

import base64
import math
import re
import sys
import uuid
from array import array
from typing import Annotated, Literal

import falcon
import msgspec
from msgspec import Meta, Struct

from cortex.api.bodies import Body, TokenId, integer, opt, says
from cortex.api.engine_client import EngineClient
from cortex.api.errors import ApiError, bad_field
from cortex.api.generation import client_id, forwarded
from cortex.api.validation import decode
from rpc.engine import Embed, Failure, FailureKind
from rpc.messages import Error

MAX_INPUTS = 2048  # inputs per request, as OpenAI allows
BAD_INPUT = (
    "'input' must be a non-empty string, an array of strings, an array of token ids, "
    f"or an array of arrays of token ids (at most {MAX_INPUTS} inputs)."
)


class EmbeddingRequest(Body, kw_only=True):
    """POST /v1/embeddings."""

    model: Annotated[str, Meta(description="A catalogue model id or alias (GET /v1/models).")]
    input: Annotated[
        str
        | Annotated[
            list[str | TokenId | Annotated[list[TokenId], Meta(min_length=1)]],
            Meta(min_length=1, max_length=MAX_INPUTS),
        ],
        Meta(
            description="Text, an array of texts, an array of token ids, or an array of arrays of token ids; "
            "one vector per text or id array. Each must fit the model's context."
        ),
        says(type=BAD_INPUT, value=BAD_INPUT, inner=BAD_INPUT),
    ]
    encoding_format: Annotated[
        Literal["float", "base64"] | None,
        Meta(description="float (the default), or base64: each vector's little-endian float32 bytes."),
        says(value="'encoding_format' must be float or base64."),
    ] = "float"
    dimensions: opt(
        integer(1),
        "Keep the first this many features, L2-normalised again; at most the model's hidden size (else a 400).",
    ) = None
    user: opt(str, "Accepted and ignored.") = None


class EmbeddingObject(Struct):
    object: Literal["embedding"]
    index: int
    embedding: Annotated[
        list[float] | str, Meta(description="A unit vector; with encoding_format base64, its float32 bytes.")
    ]


class EmbeddingUsage(Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Struct):
    """The answer of POST /v1/embeddings: one vector per input, in input order."""

    object: Literal["list"]
    data: list[EmbeddingObject]
    model: str
    usage: EmbeddingUsage


def schemas(ref_template: str) -> dict:
    """The request and answer schemas, for /openapi.json."""
    _, components = msgspec.json.schema_components((EmbeddingRequest, EmbeddingList), ref_template=ref_template)
    for schema in components.values():
        schema.pop("title", None)
    return components


def parse_input(value: str | list) -> tuple[list[str] | None, list[list[int]] | None]:
    """(texts, token id arrays): one of the two; every input non-empty, all of one kind."""
    if isinstance(value, str):
        value = [value]
        single = True
    else:
        single = len(value) == 1 and not isinstance(value[0], int)
    if all(isinstance(x, str) for x in value):
        for i, text in enumerate(value):
            if not text:
                where = "input" if single else f"input[{i}]"
                raise bad_field(where, f"'{where}' is empty: send at least one character of text.")
        return value, None
    if all(isinstance(x, int) for x in value):
        return None, [value]
    if all(isinstance(x, list) for x in value):
        return None, value
    raise bad_field("input", BAD_INPUT + " An array may not mix them.")


class Embeddings:
    def __init__(self, engine: EngineClient, max_body_bytes: int):
        self.engine, self.max_body_bytes = engine, max_body_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = decode(req, EmbeddingRequest, self.max_body_bytes)
        texts, ids = parse_input(body.input)
        msg = Embed(
            request_id=f"embd-{uuid.uuid4().hex}",
            model=body.model,
            inputs=texts,
            input_ids=ids,
            dimensions=body.dimensions,
            client=client_id(req),
            hop=forwarded(req),
        )
        record = req.context.get("record")  # the request log's, where it keeps one for this path
        if record is not None:
            record.submitted(msg.request_id, msg.model, msg.client, body.input)
        try:
            answer = self.engine.ask(msg, msg.request_id, error=_error)
        except ApiError as err:
            if record is not None and err.code == "model_not_found":
                record.unknown_model()  # never a label value a client can invent
            raise
        dim, raw, tokens = answer["dim"], answer["vectors"], answer["prompt_tokens"]
        if record is not None:
            record.prompt_tokens = tokens
        data = [
            {"object": "embedding", "index": i, "embedding": render(raw[i * dim * 4 : (i + 1) * dim * 4], body)}
            for i in range(len(raw) // (dim * 4))
        ]
        resp.media = {
            "object": "list",
            "data": data,
            "model": body.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


def render(raw: bytes, body: EmbeddingRequest) -> list[float] | str:
    """One vector (little-endian float32 bytes, unit length) as the client asked for it: cut to
    ``dimensions`` and normalised again, as floats or base64."""
    vec = array("f")
    vec.frombytes(raw)
    if sys.byteorder == "big":
        vec.byteswap()
    if body.dimensions is not None and body.dimensions < len(vec):
        vec = vec[: body.dimensions]
        norm = math.sqrt(math.fsum(x * x for x in vec))
        if norm > 0:
            vec = array("f", (x / norm for x in vec))
    if body.encoding_format == "base64":
        if sys.byteorder == "big":
            vec.byteswap()
        return base64.b64encode(vec.tobytes()).decode("ascii")
    return vec.tolist()


_NAMED = re.compile(r"'(input(?:\[\d+\])?|dimensions)'")


def _error(ev: object) -> ApiError:
    if isinstance(ev, Failure):
        err = ApiError.from_failure(ev.kind, ev.message, ev.retry_after)
        named = _NAMED.search(ev.message)
        if (
            err.status == 400
            and named
            and ev.kind in (FailureKind.INVALID_REQUEST, FailureKind.CONTEXT_LENGTH_EXCEEDED)
        ):
            err.param = named.group(1)  # the field the leader's check names
        return err
    if isinstance(ev, Error):
        return ApiError(500, f"engine error: {ev.message}", "server_error", ev.kind)
    return ApiError(500, f"unexpected engine reply {type(ev).__name__}", "server_error", None)

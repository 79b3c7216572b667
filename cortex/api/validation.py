"""Reading and checking request bodies: size, JSON, and typed fields, with errors that name the field."""

from __future__ import annotations

import json
from typing import Any

import falcon

from cortex.api.errors import ApiError, bad_field


def read_json(req: falcon.Request, max_bytes: int) -> dict[str, Any]:
    length = req.content_length
    if length is not None and length > max_bytes:
        raise ApiError(
            413,
            f"Request body of {length} bytes is larger than the limit of {max_bytes} bytes.",
            "invalid_request_error",
            "request_too_large",
        )
    raw = req.bounded_stream.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ApiError(
            413,
            f"Request body is larger than the limit of {max_bytes} bytes.",
            "invalid_request_error",
            "request_too_large",
        )
    if not raw:
        raise ApiError(400, "The request body is empty; expected a JSON object.", code="invalid_json")
    req.context.raw_body = raw  # a request another leader serves is forwarded as the client sent it
    try:
        body = json.loads(raw, parse_constant=_not_json)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, _not_json's
        raise ApiError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def _not_json(word: str) -> float:
    """Python's json module reads NaN and Infinity, which JSON has no words for. Refused: a NaN passes
    every range check (each comparison is false), and a NaN penalty would poison the sampler."""
    raise ValueError(f"{word} is not a JSON value")


_MISSING = object()
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def field(
    body: dict,
    name: str,
    types: type | tuple,
    required: bool = False,
    default: Any = None,
    lo: float | None = None,
    hi: float | None = None,
) -> Any:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise ApiError(400, f"Missing required parameter: '{name}'.", code="missing_required_parameter", param=name)
        return default
    types_ = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types_ or not isinstance(value, types_):
        expected = " or ".join(_NAMES.get(t, t.__name__) for t in types_)
        raise bad_field(
            name,
            f"Invalid type for '{name}': expected {expected}, but got {_NAMES.get(type(value), type(value).__name__)}.",
        )
    if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        raise bad_field(name, f"Invalid value for '{name}': {value} does not fit in a 64-bit integer.")
    if lo is not None and value < lo:
        raise bad_field(name, f"Invalid value for '{name}': {value} is less than the minimum of {lo}.")
    if hi is not None and value > hi:
        raise bad_field(name, f"Invalid value for '{name}': {value} is greater than the maximum of {hi}.")
    return value


_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    list: "an array",
    dict: "an object",
    type(None): "null",
}

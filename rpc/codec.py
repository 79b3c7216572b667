"""msgpack encoding of message dataclasses.

A message class registers itself under its ``type`` name; decoding looks the name up and rebuilds
nested dataclasses from their type hints, so messages stay plain dataclasses with no wire code.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, TypeVar

import msgpack

T = TypeVar("T")

_REGISTRY: dict[str, type] = {}


class DecodeError(ValueError):
    """A frame that is not a valid message: bad msgpack, unknown type, or wrong fields."""


def message(cls: type[T]) -> type[T]:
    """Class decorator: make ``cls`` a dataclass and register it under its class name."""
    cls = dataclasses.dataclass(cls)
    _REGISTRY[cls.__name__] = cls
    return cls


def encode(msg: Any, msg_id: int = 0) -> bytes:
    body = _to_wire(msg)
    body["type"] = type(msg).__name__
    body["id"] = msg_id
    return msgpack.packb(body, use_bin_type=True)


def decode(frame: bytes) -> tuple[int, Any]:
    """Return ``(id, message)``; raise DecodeError, and only DecodeError, for anything that is not a
    known message: a receiver must survive any bytes a peer sends."""
    try:
        return _decode(frame)
    except DecodeError:
        raise
    except Exception as exc:  # odd but valid msgpack (e.g. mixed key types) must not escape as a crash
        raise DecodeError(f"malformed message: {type(exc).__name__}: {exc}") from None


def _decode(frame: bytes) -> tuple[int, Any]:
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(f"not msgpack: {exc}") from None
    if not isinstance(body, dict):
        raise DecodeError("frame is not a map")
    msg_id = body.pop("id", 0)
    if not isinstance(msg_id, int) or isinstance(msg_id, bool):
        raise DecodeError("'id' must be an integer")
    name = body.pop("type", None)
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise DecodeError(f"unknown message type {name!r}")
    return msg_id, _build(cls, body)


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    return value


@functools.cache
def _fields(cls: type) -> tuple[dict[str, Any], frozenset[str]]:
    """A class's type hints and field names: resolving the hints costs about a millisecond for a
    message like Submit, far more than the rest of decoding, and they never change."""
    return typing.get_type_hints(cls), frozenset(f.name for f in dataclasses.fields(cls))


def _build(cls: type, data: Any) -> Any:
    if not isinstance(data, dict):
        raise DecodeError(f"{cls.__name__}: expected a map, got {type(data).__name__}")
    hints, names = _fields(cls)
    unknown = set(data) - names
    if unknown:
        raise DecodeError(f"{cls.__name__}: unknown fields {sorted(map(repr, unknown))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{cls.__name__}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise DecodeError(f"{cls.__name__}: {exc}") from None


_SCALARS = {int: (int,), float: (float, int), str: (str,), bool: (bool,), bytes: (bytes,)}


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(options[0], value, where)
    if origin is list:
        if not isinstance(value, list):
            raise DecodeError(f"{where}: expected a list")
        (item,) = typing.get_args(hint) or (Any,)
        return [_convert(item, v, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise DecodeError(f"{where}: expected a map")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value)
    accepted = _SCALARS.get(hint)
    if accepted is not None:
        if isinstance(value, bool) and hint is not bool:
            raise DecodeError(f"{where}: expected {hint.__name__}, got bool")
        if not isinstance(value, accepted):
            raise DecodeError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
        return float(value) if hint is float else value
    return value

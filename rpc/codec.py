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


_PLAIN = (int, float, str, bool, bytes, type(None))


def _to_wire(value: Any) -> Any:
    if isinstance(value, _PLAIN):  # most values: checked first, a step carries hundreds of them
        return value
    names = _field_names(type(value))
    if names is not None:
        return {name: _to_wire(getattr(value, name)) for name in names}
    if isinstance(value, (list, tuple)):
        return [v if isinstance(v, _PLAIN) else _to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    return value


@functools.cache
def _field_names(cls: type) -> tuple[str, ...] | None:
    return tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else None


Convert = typing.Callable[[Any, str], Any]  # (wire value, where it sits) -> checked value


@functools.cache
def _fields(cls: type) -> tuple[dict[str, tuple[Convert, str]], frozenset[str]]:
    """Per field of a message class: its converter and its name for errors. Resolving type hints
    costs about a millisecond for a message like Submit and walking them per value most of a
    step's decoding; both happen once per class."""
    hints = typing.get_type_hints(cls)
    names = frozenset(f.name for f in dataclasses.fields(cls))
    return {name: (_converter(hints[name]), f"{cls.__name__}.{name}") for name in names}, names


def _build(cls: type, data: Any) -> Any:
    if not isinstance(data, dict):
        raise DecodeError(f"{cls.__name__}: expected a map, got {type(data).__name__}")
    fields, names = _fields(cls)
    unknown = data.keys() - names
    if unknown:
        raise DecodeError(f"{cls.__name__}: unknown fields {sorted(map(repr, unknown))}")
    kwargs = {}
    for name, value in data.items():
        convert, where = fields[name]
        kwargs[name] = convert(value, where)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise DecodeError(f"{cls.__name__}: {exc}") from None


_SCALARS = {int: (int,), float: (float, int), str: (str,), bool: (bool,), bytes: (bytes,)}


@functools.cache
def _converter(hint: Any) -> Convert:
    """A function that checks (and for floats, converts) a wire value against a type hint."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return lambda value, where: value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        inner = _converter(next(a for a in args if a is not type(None)))
        if type(None) not in args:
            return inner
        return lambda value, where: None if value is None else inner(value, where)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return _list_converter(item)
    if origin is dict:

        def mapping(value: Any, where: str) -> Any:
            if not isinstance(value, dict):
                raise DecodeError(f"{where}: expected a map")
            return value

        return mapping
    if dataclasses.is_dataclass(hint):
        return lambda value, where: _build(hint, value)
    if hint in _SCALARS:
        return _scalar_converter(hint)
    return lambda value, where: value


def _scalar_converter(hint: type) -> Convert:
    accepted = _SCALARS[hint]

    def scalar(value: Any, where: str) -> Any:
        if isinstance(value, bool) and hint is not bool:
            raise DecodeError(f"{where}: expected {hint.__name__}, got bool")
        if not isinstance(value, accepted):
            raise DecodeError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
        return float(value) if hint is float else value

    return scalar


def _list_converter(item: Any) -> Convert:
    convert = _converter(item)
    exact = item if item in (int, str, bool, bytes) else None  # values of exactly this type pass as they are

    def items(value: Any, where: str) -> Any:
        if not isinstance(value, list):
            raise DecodeError(f"{where}: expected a list")
        if exact is not None and all(type(v) is exact for v in value):  # token ids, block tables
            return value
        return [convert(v, where) for v in value]

    return items

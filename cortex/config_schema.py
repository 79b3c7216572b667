"""Declaring a TOML key once, and reading a table by its declarations (cortex.config uses both).

A table is a frozen dataclass; each key is a field whose Python type is the declared type and whose
default is ``key(default, doc, rule=...)``: its default, a one-line doc and its constraint (``gt``,
``ge``, ``choices``, or a ``check`` function). ``read_table`` checks a parsed TOML table against
them (unknown keys, types, required keys, constraints) and builds the dataclass;
``cortex.config_reference`` writes docs/configuration.md from the same declarations.

Why dataclasses with field metadata rather than msgspec Structs (msgspec is a dependency, and
``Annotated[int, Meta(ge=0, description=...)]`` reads as well): the loaded objects stay frozen
dataclasses, so ``dataclasses.replace`` (``cortex serve --listen``, reload's restart-only keys) and
equality (reload's catalogue diff) work on them as before; and each error stays a ConfigError
worded as before (file, TOML key, what was expected), which msgspec's "Expected `int`, got `str` -
at `$.workers`" would change, while devices, host:port, URLs and file-relative paths need checks of
our own anyway.
"""

from __future__ import annotations

import dataclasses
import functools
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    def __init__(self, file: str | Path, key: str, problem: str):
        self.file, self.key, self.problem = str(file), key, problem
        where = f"{self.file}: {key}: " if key else f"{self.file}: "
        super().__init__(where + problem)


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_host_port(v: str) -> HostPort:
    host, sep, port = v.rpartition(":")
    if not sep or not host or (":" in host and not host.startswith("[")):
        raise ValueError(f"expected 'host:port' (IPv6 as '[::1]:port'), got {v!r}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected a port between 1 and 65535, got {port!r}")
    return HostPort(host.strip("[]"), int(port))


# -- declaring a key ------------------------------------------------------------------------------

REQUIRED: Any = object()
Check = Callable[[Any], str | None]  # the value as written -> what is wrong with it, or None


@dataclass(frozen=True)
class Key:
    """One key of a TOML table: the metadata of the dataclass field that holds its value."""

    doc: str
    default: Any = REQUIRED  # as the attribute holds it
    factory: Callable[[], Any] | None = None  # a default computed when loading; "" in the file asks for it too
    gt: float | None = None
    ge: int | None = None
    choices: tuple[str, ...] = ()
    check: Check | None = None  # its docstring says what it allows (for docs/configuration.md)
    name: str = ""  # the key in the file, when not the attribute's name

    def problem(self, v: Any) -> str | None:
        if self.gt is not None and not v > self.gt:
            return f"expected a number > {self.gt}, got {v}"
        if self.ge is not None and not v >= self.ge:
            return f"expected {'a number' if isinstance(v, float) else 'an integer'} >= {self.ge}, got {v}"
        if self.choices and v not in self.choices:
            return f"expected one of {', '.join(self.choices)}; got {v!r}"
        return self.check(v) if self.check else None


def key(default: Any = REQUIRED, doc: str = "", *, factory: Callable[[], Any] | None = None, **rules: Any) -> Any:
    """A table's field: its ``default`` (none: the key is required), ``doc``, and ``rules`` (Key's
    gt, ge, choices, check, name)."""
    meta = {"key": Key(doc, default, factory, **rules)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(metadata=meta) if default is REQUIRED else field(default=default, metadata=meta)


# -- reading a table ------------------------------------------------------------------------------

# a declared type -> the TOML types its value may be written as
TOML_TYPES: dict[Any, tuple[type, ...]] = {
    str: (str,),
    int: (int,),
    float: (int, float),
    bool: (bool,),
    HostPort: (str,),
    Path: (str,),  # relative to the file's directory
    tuple[str, ...]: (list,),
    list[str]: (list,),
}
TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list", dict: "a table"}


@dataclass(frozen=True)
class Declared:
    attr: str  # the dataclass field
    types: tuple[Any, ...]  # its declared type, or the members of its union, None left out
    key: Key


@functools.cache
def keys(cls: type) -> dict[str, Declared]:
    """A table's keys, by their name in the file, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if "key" in f.metadata:
            tp, k = hints[f.name], f.metadata["key"]
            members = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
            out[k.name or f.name] = Declared(f.name, tuple(t for t in members if t is not type(None)), k)
    return out


def read_table(file: Path, where: str, data: Any, cls: type) -> Any:
    """``cls`` from one parsed TOML table, each key checked; relative paths are relative to ``file``."""
    if not isinstance(data, dict):
        raise ConfigError(file, where, f"expected a table, got {type(data).__name__}")
    schema = keys(cls)
    unknown = sorted(set(data) - set(schema))
    if unknown:
        raise ConfigError(file, f"{where} {unknown[0]}", f"unknown key (known keys: {', '.join(schema)})")
    out = {}
    for name, d in schema.items():
        label, value, k = f"{where} {name}".strip(), data.get(name), d.key
        if name not in data or (value == "" and k.factory):
            if k.default is REQUIRED and not k.factory:
                raise ConfigError(file, label, "required key is missing")
            value = k.factory() if k.factory else k.default
        else:
            value = _parse(file, label, value, d)
        if isinstance(value, Path):
            value = value.expanduser()
            value = value if value.is_absolute() else file.parent / value
        out[d.attr] = value
    return cls(**out)


def _parse(file: Path, label: str, value: Any, d: Declared) -> Any:
    tp = next((t for t in d.types if _is(value, TOML_TYPES[t])), None)
    if tp is None:
        written = dict.fromkeys(t for member in d.types for t in TOML_TYPES[member])
        names = " or ".join(TYPE_NAMES[t] for t in written)
        got = TYPE_NAMES.get(type(value), type(value).__name__)
        raise ConfigError(file, label, f"expected {names}, got {got} {value!r}")
    problem = d.key.problem(value)
    if problem is None:
        try:
            return _convert(tp, value)
        except ValueError as exc:  # a host:port that is not one
            problem = str(exc)
    raise ConfigError(file, label, problem)


def _is(value: Any, toml_types: tuple[type, ...]) -> bool:
    return isinstance(value, toml_types) and (bool in toml_types or not isinstance(value, bool))


def _convert(tp: Any, v: Any) -> Any:
    if tp is float:
        return float(v)
    if tp is HostPort:
        return parse_host_port(v)
    if tp is Path:
        return Path(v)
    return tuple(v) if tp == tuple[str, ...] else v


def read_toml(file: Path) -> dict[str, Any]:
    try:
        with open(file, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(file, "", "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", f"TOML syntax error: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(file, "", f"not UTF-8 text (byte {exc.start}): TOML files must be UTF-8") from None
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read: {exc.strerror}") from None

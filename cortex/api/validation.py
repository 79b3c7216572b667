"""Reading request bodies: size, JSON, then the types declared in ``cortex.api.bodies``, with errors
that name the field.

A body is decoded by msgspec straight from the bytes into its declared type. Only when that fails
is it read again, the slow way: by Python's json (whose messages clients have always seen, and
which reads what msgspec does not: UTF-16, lone surrogates), then converted from Python objects
with each object's fields in checking order (required ones first, then as declared), and the
first error msgspec meets is worded as the API words it by walking the declaration down the
error's path (``explain``). A bad request costs about 0.1 ms more than it used to; a good one
decodes several times faster.

The bytes are read and checked first (``cortex.api.rawbody``: the size limit, chunked bodies, the
nesting depth) and the text after Python's json reads it (lone surrogates); the 400 names the field
where the body nests too deep, or the string that is not Unicode.

A JSON schema the output must follow (a response format, a tool's parameters, a custom tool's
regex) is checked here too, by the grammar engine the leader compiles it with (``check_schema``):
a schema it cannot read is a 400 naming that field, with the engine's reason alone.
"""

from __future__ import annotations

import json
import re
import types
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import falcon
import llguidance as llg
import msgspec

from cortex.api.bodies import INT64_MAX, INT64_MIN, Body
from cortex.api.errors import ApiError, bad_field
from cortex.api.rawbody import MAX_JSON_DEPTH, lone_surrogate, read_raw, too_deep_at

B = TypeVar("B", bound=Body)
MISSING: Any = msgspec.UNSET  # a field the body does not have


def check_schema(schema: dict[str, Any], param: str, what: str = "schema") -> None:
    """A 400 naming ``param`` when the grammar engine cannot read ``schema`` (``what`` words it)."""
    # lenient, as the leader compiles it (cortex/engine/constraint.py): keywords it cannot enforce
    # are ignored there, so they are not refused here
    problem = _schema_problem(json.dumps({**schema, "x-guidance": {"lenient": True}}, sort_keys=True))
    if problem:
        raise bad_field(param, f"Invalid {what} in '{param}': {problem}")


@lru_cache(maxsize=256)  # an agent sends the same tools with every turn
def _schema_problem(text: str) -> str:
    try:
        return llg.LLMatcher.validate_grammar(llg.LLMatcher.grammar_from_json_schema(text))
    except ValueError as exc:  # what it cannot even read as a schema (a number too big)
        return str(exc)


def decode(req: falcon.Request, cls: type[B], max_bytes: int) -> B:
    """The request's body as ``cls``, or the 400 (413) that names what is wrong with it."""
    raw = read_raw(req, max_bytes)
    deep = too_deep_at(raw)
    if deep is not None:
        raise _too_deep(deep, cls)
    try:
        return msgspec.json.decode(raw, type=cls)
    except msgspec.DecodeError:  # ValidationError too: the slow path finds and words the error
        pass
    except RecursionError:  # too_deep_at read the bytes some other way (it never should)
        raise _too_deep([], cls) from None
    body = _loads(raw, cls)
    unicode = not_unicode(body, cls)  # msgspec refuses lone surrogates; Python's json reads them
    if unicode:
        raise unicode
    missing = missing_field(body, cls)  # the missing model before the bad stop, as the API always said
    if missing:
        raise missing
    try:
        return msgspec.convert(_ordered(body, cls), cls)
    except msgspec.ValidationError as exc:
        raise explain(exc, body, cls) from None


def _loads(raw: bytes, cls: type[Body]) -> dict[str, Any]:
    try:
        body = json.loads(raw, parse_constant=_not_json)
    except RecursionError:
        raise _too_deep([], cls) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, _not_json's
        raise ApiError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def _not_json(word: str) -> float:
    """Python's json module reads NaN and Infinity, which JSON has no words for. Refused: a NaN passes
    every range check (each comparison is false), and a NaN penalty would poison the sampler."""
    raise ValueError(f"{word} is not a JSON value")


# -- too deep, not Unicode: the field to name ---------------------------------------------------------


def _too_deep(path: list[str | int], cls: type[Body]) -> ApiError:
    """The 400 for a body nested too deep at ``path``, naming the field it is in."""
    field = _declared(cls, path)
    limit = f"JSON nested deeper than the limit of {MAX_JSON_DEPTH} levels"
    if not field:
        return ApiError(400, f"The request body holds {limit}.", code="invalid_value")
    param = _dotted(field, cls.dots)
    return bad_field(param, f"{param}: {limit}." if cls.dots else f"Invalid value for '{param}': {limit}.")


def _declared(cls: type[Body], path: list[str | int]) -> list[str | int]:
    """The start of ``path`` down to the field it is in: the first free-form value (a JSON schema,
    template variables, tool input) or unknown field on the way, else the whole path."""
    ann: Any = cls
    for i, label in enumerate(path):
        ann = _declared_child(ann, label)
        if ann is None or _free_form(ann):
            return path[: i + 1]
    return path


def _declared_child(ann: Any, label: str | int) -> Any:
    for m in _members(ann):
        base = _strip(m)[0]
        if isinstance(label, int) and get_origin(base) is list:
            return get_args(base)[0]
        if isinstance(label, str) and isinstance(base, type) and issubclass(base, msgspec.Struct):
            found = next((f.type for f in _fields(base) if f.name == label), None)
            if found is not None:
                return found
        if isinstance(label, str) and get_origin(base) is dict:
            return get_args(base)[1]
    return None


def _free_form(ann: Any) -> bool:
    """Any JSON goes: Any, or an object of Any."""
    for m in _members(ann):
        base = _strip(m)[0]
        if base is Any or (get_origin(base) is dict and get_args(base)[1] is Any):
            return True
    return False


def not_unicode(body: Any, cls: type[Body]) -> ApiError | None:
    """The 400 for the first string or key (in the body's order) with a lone surrogate: Python's
    json reads ``"\\ud800"``, but it is no Unicode text, and no tokenizer or encoder takes it."""
    found = lone_surrogate(body)
    if found is None:
        return None
    path, char, is_key = found
    surrogate = f"a lone surrogate ({ascii(char)[1:-1]}), which is not Unicode"
    if not path:
        return ApiError(400, f"The request body holds {surrogate}.", code="invalid_value")
    param = _dotted(path, cls.dots)
    what = f"{'a key' if is_key else 'the text'} holds {surrogate}"
    return bad_field(param, f"{param}: {what}." if cls.dots else f"Invalid value for '{param}': {what}.")


def _dotted(path: list[str | int], dots: bool) -> str:
    """messages[0].content (OpenAI) or messages.0.content (Anthropic)."""
    out = ""
    for label in path:
        if isinstance(label, int) and not dots:
            out += f"[{label}]"
        else:
            out += f".{label}" if out else str(label)
    return out


# -- explaining a msgspec error in the API's words ---------------------------------------------------


@dataclass
class Failure:
    """What a message declared with ``says`` sees. ``at`` is the path of the field that declares it,
    ``up`` its parent's, ``param`` the one the error names; ``owner`` is that field's value in the body,
    ``value`` the value at fault, ``below`` the path from ``at`` down to it."""

    kind: str  # missing | type | value
    value: Any
    key: str | None  # the object key, for a value in a map (logit_bias)
    at: str
    up: str
    param: str
    owner: Any
    below: tuple = ()
    chain: list[Any] = field(default_factory=list, repr=False)  # the body's values from the root down to owner

    def above(self, n: int) -> Any:
        return self.chain[-1 - n] if len(self.chain) > n else None


@dataclass
class _Step:
    label: str | int  # field name, list index or object key
    ann: Any  # the declared type (Annotated kept)
    value: Any
    extra: dict = field(default_factory=dict)  # the says(...) texts declared at this step
    dict_key: bool = False  # label is a key of a JSON object (logit_bias)
    struct: type | None = None  # the Struct whose field this is


_AT = re.compile(r" - at `(key` in `)?\$([^`]*)`$")
_MISSING_FIELD = re.compile(r"^Object missing required field `([^`]+)`")
_SEGMENT = re.compile(r"\.(\w+)|\[(\d+|\.\.\.)\]")


def explain(exc: msgspec.ValidationError, body: dict, cls: type[Body]) -> ApiError:
    text = str(exc)
    where = _AT.search(text)
    missing = _MISSING_FIELD.match(text)
    steps = [_Step("", cls, body)]
    try:
        for name, index in _SEGMENT.findall(where.group(2)) if where else []:
            steps.append(_child(steps[-1], name or (int(index) if index != "..." else ...)))
        if where and where.group(1):  # an object key that does not fit
            steps.append(_bad_key(steps[-1]))
        if missing:
            steps.append(_child(steps[-1], missing.group(1)))
        elif steps[-1].struct is not None:  # msgspec finds missing fields last, but they are checked first
            order = _order(steps[-1].struct)
            before = order[: order.index(steps[-1].label)]
            absent = [n for n in before if _required(steps[-1].struct, n) and n not in steps[-2].value]
            if absent:
                steps[-1] = _child(steps[-2], absent[0])
        return _message(steps, cls)
    except (LookupError, StopIteration, TypeError, ValueError):  # a shape the walk does not know: msgspec's words
        path = _path(steps, cls.dots)
        return bad_field(path or None, f"Invalid value{f' for {path!r}' if path else ''}: {_AT.sub('', text)}.")


def missing_field(body: dict, cls: type[Body]) -> ApiError | None:
    """A required top-level field absent or null, named before anything else is checked."""
    for f in _fields(cls):
        if f.required and body.get(f.name) is None:
            return _message([_Step("", cls, body), _with_extra(_Step(f.name, f.type, MISSING))], cls)
    return None


def _message(steps: list[_Step], cls: type[Body]) -> ApiError:
    last = steps[-1]
    if last.value is MISSING or (last.value is None and len(steps) == 2 and _required(cls, last.label)):
        kind = "missing"  # a top-level null is "not given"
    elif _kind(last.value) in _kinds(last.ann):
        kind = "value"
    else:
        kind = "type"
    key = next((s.label for s in reversed(steps) if s.dict_key), None)
    for i in range(len(steps) - 1, 0, -1):
        extra = steps[i].extra
        says = (extra.get(kind) or extra.get("any")) if i == len(steps) - 1 else extra.get("inner")
        if not says:
            continue
        param = _path(steps[: i + 1 - extra.get("param", 0)], cls.dots)
        failure = Failure(
            kind,
            last.value,
            key,
            at=_path(steps[: i + 1], cls.dots),
            up=_path(steps[:i], cls.dots),
            param=param,
            owner=steps[i].value,
            below=tuple(s.label for s in steps[i + 1 :]),
            chain=[s.value for s in steps[: i + 1]],
        )
        message = says(failure) if callable(says) else says.format_map(vars(failure))
        if message is not None:  # a callable may decline: the message of a field further up, or the generic one
            return bad_field(param, message)
    at = _path(steps, cls.dots)
    if kind == "missing":
        return ApiError(400, f"Missing required parameter: '{at}'.", code="missing_required_parameter", param=at)
    if kind == "type":
        expected = " or ".join(dict.fromkeys(_names(last.ann)))
        return bad_field(at, f"Invalid type for '{at}': expected {expected}, but got {_NAMES[_kind(last.value)]}.")
    return bad_field(at, f"Invalid value for '{at}': {_out_of_range(last.ann, last.value)}.")


@cache
def _order(cls: type) -> list[str]:
    """The order a struct's fields are checked in: the required ones first, then as declared."""
    fields = _fields(cls)
    return [f.name for f in fields if f.required] + [f.name for f in fields if not f.required]


def _ordered(value: Any, ann: Any) -> Any:
    """``value`` with its objects' keys in checking order, so msgspec meets the first fault first."""
    if isinstance(value, list):
        lists = [get_args(b) for b in (_strip(m)[0] for m in _members(ann)) if get_origin(b) is list]
        return [_ordered(v, lists[0][0]) for v in value] if lists else value
    if not isinstance(value, dict):
        return value
    structs = [
        b for b in (_strip(m)[0] for m in _members(ann)) if isinstance(b, type) and issubclass(b, msgspec.Struct)
    ]
    tag_field = structs[0].__struct_config__.tag_field if structs else None
    if tag_field:
        structs = [s for s in structs if s.__struct_config__.tag == value.get(tag_field)]
    if len(structs) != 1:
        return value
    types_ = {f.name: f.type for f in _fields(structs[0])}
    return {k: _ordered(value[k], types_[k]) for k in _order(structs[0]) if k in value} | value


@cache
def _fields(cls: type) -> tuple[msgspec.structs.FieldInfo, ...]:
    return msgspec.structs.fields(cls)  # each call reads the annotations again: slow


def _required(cls: type, name: Any) -> bool:
    return any(f.name == name and f.required for f in _fields(cls))


def _path(steps: list[_Step], dots: bool) -> str:
    out = ""
    for s in steps[1:]:
        if isinstance(s.label, int) and not dots:
            out += f"[{s.label}]"
        else:
            out += f".{s.label}" if out else str(s.label)
    return out


def _strip(ann: Any) -> tuple[Any, list[msgspec.Meta]]:
    metas = []
    while get_origin(ann) is Annotated:
        metas += [m for m in ann.__metadata__ if isinstance(m, msgspec.Meta)]
        ann = ann.__origin__
    return ann, metas


def _flatten(ann: Any) -> tuple[list[msgspec.Meta], list[Any]]:
    """(the Meta declared on a union as a whole, its members); a type that is no union is its one member."""
    base, metas = _strip(ann)
    if get_origin(base) not in (Union, types.UnionType):
        return [], [ann]
    outer, members = list(metas), []
    for a in get_args(base):
        o, m = _flatten(a)
        outer += o
        members += m
    return outer, members


def _members(ann: Any) -> list[Any]:
    return _flatten(ann)[1]


def _child(step: _Step, label: Any) -> _Step:
    """The step one segment down: a field, a list item, or (``...``) the first map value that fails."""
    want = "array" if isinstance(label, int) else "object"
    base = _strip(next(m for m in _members(step.ann) if want in _kinds(m)))[0]
    if label is ...:
        value_t = get_args(base)[1]
        key = _first_failing(step.value.items(), value_t)
        return _with_extra(_Step(key, value_t, step.value[key], dict_key=True))
    if isinstance(label, int):
        return _with_extra(_Step(label, get_args(base)[0], step.value[label]))
    structs = [_strip(m)[0] for m in _members(step.ann) if isinstance(_strip(m)[0], type)]
    tag_field = structs[0].__struct_config__.tag_field if structs else None
    if label == tag_field:  # a tagged union's tag: one of the tags
        return _Step(label, Literal[tuple(s.__struct_config__.tag for s in structs)], step.value.get(label, MISSING))
    if tag_field and len(structs) > 1:
        base = next(s for s in structs if s.__struct_config__.tag == step.value.get(tag_field))
    ann = next(f.type for f in _fields(base) if f.name == label)
    return _with_extra(_Step(label, ann, step.value.get(label, MISSING), struct=base))


def _bad_key(step: _Step) -> _Step:
    key_t = get_args(_strip(next(m for m in _members(step.ann) if "object" in _kinds(m)))[0])[0]
    key = _first_failing(((k, k) for k in step.value), key_t)
    return _with_extra(_Step(key, key_t, key, dict_key=True))


def _first_failing(items: Any, type_: Any) -> str:
    """The key of the first (key, value) whose value is not a ``type_`` (msgspec's path says only ``[...]``)."""
    for k, v in items:
        try:
            msgspec.convert(v, type_)
        except msgspec.ValidationError:
            return k
    raise LookupError("no entry fails")


def _with_extra(step: _Step) -> _Step:
    """The texts declared on the field: on it as a whole, and on the member of its union the value is
    (on every member, when it is none of them)."""
    outer, members = _flatten(step.ann)
    fits = [m for m in members if _kind(step.value) in _kinds(m)][:1] or members
    step.extra = _extra(outer)
    for m in reversed(fits):  # a member's own texts before the union's
        step.extra.update(_extra(_strip(m)[1]))
    return step


def _extra(metas: list[msgspec.Meta]) -> dict:
    out: dict = {}
    for m in metas:
        out.update(m.extra or {})
    return out


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), "object"
    )


def _kinds(ann: Any) -> set[str]:
    out: set[str] = set()
    for m in _members(ann):
        base, _ = _strip(m)
        if base is Any:
            return {"null", "boolean", "integer", "number", "string", "array", "object"}
        if get_origin(base) is Literal:
            out.update(_kind(v) for v in get_args(base))
        else:
            out.update(_BASE_KINDS.get(get_origin(base) or base, ("object",)))
    return out


_BASE_KINDS = {
    type(None): ("null",),
    None: ("null",),
    bool: ("boolean",),
    int: ("integer",),
    float: ("integer", "number"),
    str: ("string",),
    list: ("array",),
    dict: ("object",),
}
_NAMES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "array": "an array",
    "object": "an object",
    "null": "null",
}


def _names(ann: Any) -> list[str]:
    """What the field takes, in its declared order (a number field takes an integer too)."""
    out = []
    for m in _members(ann):
        base, _ = _strip(m)
        kinds = (
            [_kind(v) for v in get_args(base)]
            if get_origin(base) is Literal
            else _BASE_KINDS.get(get_origin(base) or base, ("object",))
        )
        out += [_NAMES[k] for k in kinds if k != "null"]
    return out


def _out_of_range(ann: Any, value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        return f"{value} does not fit in a 64-bit integer"
    member = next(m for m in _members(ann) if _kind(value) in _kinds(m))
    base, metas = _strip(member)
    if get_origin(base) is Literal:
        return f"expected one of {', '.join(str(v) for v in get_args(base))}"
    for m in metas:
        if m.ge is not None and not value >= m.ge:
            return f"{value} is less than the minimum of {m.ge}"
        if m.le is not None and not value <= m.le:
            return f"{value} is greater than the maximum of {m.le}"
        if m.gt is not None and not value > m.gt:
            return f"{value} is not greater than {m.gt}"
        if m.lt is not None and not value < m.lt:
            return f"{value} is not less than {m.lt}"
        if m.min_length is not None and len(value) < m.min_length:
            return f"expected at least {m.min_length} {'characters' if isinstance(value, str) else 'items'}"
        if m.max_length is not None and len(value) > m.max_length:
            return f"expected at most {m.max_length} {'characters' if isinstance(value, str) else 'items'}"
        if m.pattern is not None and not re.search(m.pattern, value):
            return f"expected a match of {m.pattern}"
    return "not allowed here"

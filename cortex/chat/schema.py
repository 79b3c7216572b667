"""What a tool's JSON schema says about a parameter whose value is written as text.

Qwen3.5 writes each argument of a call as the text between ``<parameter=KEY>`` tags: the schema of
the tool's parameter says whether that text stands for a number, a boolean, JSON data or just
itself. The output parser reads values by it (``typed_value``), and the call grammar constrains
them by it (cortex/engine/constraint.py).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote


def resolve(root: Any, ref: str) -> tuple[bool, Any]:
    """(found, target) of a local JSON pointer ("#", "#/$defs/A~1B") in ``root``."""
    if ref != "#" and not ref.startswith("#/"):
        return False, None
    node = root
    for part in ref[2:].split("/") if ref != "#" else []:
        part = unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


def parameter_schema(tool_schema: Any, key: str) -> Any:
    """The schema of parameter ``key`` of a tool whose parameters ``tool_schema`` describes, its
    local ``$ref``s followed (within the tool's schema); None when the tool does not describe it."""
    properties = tool_schema.get("properties") if isinstance(tool_schema, dict) else None
    schema = properties.get(key) if isinstance(properties, dict) else None
    for _ in range(16):  # a chain of refs, not a cycle
        ref = schema.get("$ref") if isinstance(schema, dict) else None
        if not isinstance(ref, str):
            break
        found, target = resolve(tool_schema, ref)
        if not found:
            break
        schema = target
    return schema


def json_types(schema: Any) -> set[str]:
    """The JSON types a schema allows, as far as ``type``, ``enum``/``const`` and ``anyOf``/``oneOf``
    tell; empty when it says nothing."""
    if not isinstance(schema, dict):
        return set()
    kind = schema.get("type")
    out = (
        {kind}
        if isinstance(kind, str)
        else {k for k in kind if isinstance(k, str)}
        if isinstance(kind, list)
        else set()
    )
    values = schema["enum"] if isinstance(schema.get("enum"), list) else [schema["const"]] if "const" in schema else []
    out |= {json_type(v) for v in values}
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or ():
            out |= json_types(sub)
    return out


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), "string")


def typed_value(text: str, schema: Any) -> Any:
    """A parameter's value as its schema types it: text that reads as JSON of an allowed type
    becomes that value; anything else (a string parameter, an unknown one, text that does not
    parse) stays the text it is."""
    types = json_types(schema)
    if not types or ("string" in types and not (text == "null" and "null" in types)):
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    kind = json_type(value)
    if kind in types or (kind == "integer" and "number" in types):
        return value
    if kind == "number" and "integer" in types and value.is_integer():
        return int(value)
    return text

"""The Responses API's input items and tools, read into the chat template convention.

Messages keep their role (``developer`` is a system message); a ``function_call`` item joins the
assistant turn before it as a tool call and a ``function_call_output`` is a tool message; a
``custom_tool_call`` is the call of a custom tool (a function of one string argument, ``input``,
as the model sees it: cortex/api/responses.py) and a ``custom_tool_call_output`` its tool message.
Stored responses' output items are read back the same way (``previous_response_id``).
"""

from __future__ import annotations

import json
from typing import Any

from cortex.api.errors import bad_field
from cortex.api.validation import check_schema

ROLES = ("system", "developer", "user", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text")


def parse_items(items: list[dict[str, Any]], at: str) -> list[dict[str, Any]]:
    """Input or output items as chat messages. A reasoning item becomes the ``reasoning_content``
    of the assistant turn it precedes (templates keep it where the model needs it: within a tool
    loop after the last user message)."""
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"{at}[{i}]"
        if not isinstance(item, dict):
            raise bad_field(where, f"Invalid type for '{where}': expected an object.")
        kind = item.get("type", "message")
        if kind == "message":
            message = _message(item, where)
            if message["role"] == "assistant" and _reasoning_only(messages):
                messages[-1]["content"] = message["content"]  # the answer after its reasoning
            else:
                messages.append(message)
        elif kind == "function_call":
            _add_call(messages, item, where)
        elif kind == "custom_tool_call":  # a free-form call: its text is the one argument the model wrote
            _add_call(messages, {**item, "arguments": json.dumps({CUSTOM_INPUT: _string(item, "input", where)})}, where)
        elif kind in ("function_call_output", "custom_tool_call_output"):
            call_id = _string(item, "call_id", where)
            messages.append({"role": "tool", "tool_call_id": call_id, "content": _output_text(item, where)})
        elif kind == "reasoning":
            text = _reasoning_text(item, where)
            if _reasoning_only(messages):
                messages[-1]["reasoning_content"] += "\n" + text
            elif text:
                messages.append({"role": "assistant", "content": "", "reasoning_content": text})
        else:
            raise bad_field(f"{where}.type", f"Input item type {kind!r} is not supported.")
    return messages


def _reasoning_only(messages: list[dict[str, Any]]) -> bool:
    """The last message is an assistant turn holding reasoning alone (no answer or call yet)."""
    last = messages[-1] if messages else None
    return bool(last and last["role"] == "assistant" and "reasoning_content" in last) and not (
        last["content"] or last.get("tool_calls")
    )


def _reasoning_text(item: dict, at: str) -> str:
    """A reasoning item's text: its ``content`` (reasoning_text parts), else its ``summary``."""
    for key in ("content", "summary"):
        parts = item.get(key) or []
        if not isinstance(parts, list):
            raise bad_field(f"{at}.{key}", f"Invalid type for '{at}.{key}': expected an array.")
        texts = [p.get("text") for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)]
        if texts:
            return "\n".join(texts)
    return ""


def _string(item: dict, key: str, at: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise bad_field(f"{at}.{key}", f"Missing or invalid '{at}.{key}': expected a string.")
    return value


def _message(item: dict, at: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in ROLES:
        raise bad_field(f"{at}.role", f"Invalid value for '{at}.role': expected one of {', '.join(ROLES)}.")
    return {"role": "system" if role == "developer" else role, "content": _text(item.get("content"), f"{at}.content")}


def _text(content: Any, at: str) -> str:
    """A string, or text parts joined; other parts (images, files) are refused by name."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_field(at, f"Invalid type for '{at}': expected a string or an array of content parts.")
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise bad_field(f"{at}[{j}]", f"Content part type {kind!r} is not supported by this model.")
        out.append(part["text"])
    return "".join(out)


def _output_text(item: dict, at: str) -> str:
    output = item.get("output")
    if isinstance(output, str):
        return output
    return _text(output, f"{at}.output")


def _add_call(messages: list[dict], item: dict, at: str) -> None:
    """A call the model made earlier: joins the assistant turn just before it, or starts one."""
    args_text = item.get("arguments", "{}")
    try:
        args = json.loads(args_text) if isinstance(args_text, str) and args_text.strip() else {}
    except ValueError:
        args = None
    if not isinstance(args, dict):
        raise bad_field(f"{at}.arguments", "Tool call arguments must be a JSON object.")
    call = {"id": _string(item, "call_id", at), "type": "function"}
    call["function"] = {"name": _string(item, "name", at), "arguments": args}
    if not messages or messages[-1]["role"] != "assistant":
        messages.append({"role": "assistant", "content": ""})
    messages[-1].setdefault("tool_calls", []).append(call)


CUSTOM_INPUT = "input"  # the one argument in which the model writes a custom tool's free-form text


def parse_tools(
    listed: list[dict[str, Any]] | None, choice: str | dict[str, Any] | None
) -> tuple[list[dict] | None, str, str | None]:
    """(tools as {"name", "description", "parameters"}, tool_choice none|auto|required, forced name)."""
    tools: list[dict] = []
    kinds: dict[str, str] = {}  # name -> function | custom
    for i, t in enumerate(listed or []):
        kind = t.get("type")
        if kind not in ("function", "custom"):
            message = f"Tool type {kind!r} is not supported; only function and custom tools are."
            raise bad_field(f"tools[{i}].type", message)
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise bad_field(f"tools[{i}].name", f"Invalid tool at 'tools[{i}]': expected a {kind} tool with a name.")
        if name in kinds:
            raise bad_field(f"tools[{i}].name", f"Tool name '{name}' is used twice in 'tools'.")
        kinds[name] = kind
        if kind == "custom":
            tools.append(_custom_tool(t, name, f"tools[{i}]"))
            continue
        params = t.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise bad_field(f"tools[{i}].parameters", "Function parameters must be a JSON schema object.")
        check_schema(params, f"tools[{i}].parameters")
        tools.append({"name": name, "description": t.get("description") or "", "parameters": params})
    if choice is None:
        return tools or None, "auto", None
    if choice in ("none", "auto", "required"):
        return tools or None, choice, None
    kind = choice.get("type") if isinstance(choice, dict) else None
    name = choice.get("name") if kind in ("function", "custom") else None
    if not isinstance(name, str):
        message = "'tool_choice' must be none, auto, required, {type: function, name} or {type: custom, name}."
        raise bad_field("tool_choice", message)
    if kinds.get(name) != kind:
        raise bad_field("tool_choice", f"Tool choice names {kind} tool '{name}', which is not in 'tools'.")
    return tools, "required", name


def _custom_tool(t: dict, name: str, at: str) -> dict:
    """A custom tool as the function the model calls: one string argument, ``input``; a regex
    grammar is that string's pattern (anchored: the whole input matches)."""
    fmt = t.get("format") or {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    text: dict[str, Any] = {"type": "string"}
    note = f"Its one argument, `{CUSTOM_INPUT}`, is free-form text (the raw input itself, not JSON)."
    if kind == "grammar":
        syntax, definition = fmt.get("syntax"), fmt.get("definition")
        if syntax != "regex":
            message = (
                f"Custom tool grammar syntax {syntax!r} is not supported: its input cannot be constrained by "
                "this server's grammar engine; use a 'regex' grammar or a 'text' format."
            )
            raise bad_field(f"{at}.format.syntax", message)
        if not isinstance(definition, str) or not definition:
            raise bad_field(f"{at}.format.definition", f"'{at}.format.definition' must be a non-empty regex.")
        check_schema({"type": "string", "pattern": definition}, f"{at}.format.definition", "regex")
        text["pattern"] = f"^(?:{definition})$"
        note = f"Its one argument, `{CUSTOM_INPUT}`, is text matching the regular expression `{definition}`."
    elif kind != "text":
        raise bad_field(f"{at}.format.type", f"Custom tool format {kind!r} is not supported; use text or grammar.")
    description = t.get("description") or ""
    parameters = {"type": "object", "properties": {CUSTOM_INPUT: text}, "required": [CUSTOM_INPUT]}
    parameters["additionalProperties"] = False
    return {"name": name, "description": f"{description}\n\n{note}".strip(), "parameters": parameters}


def custom_names(listed: list[dict[str, Any]] | None) -> frozenset[str]:
    """The names of the request's custom tools: their calls are ``custom_tool_call`` items."""
    return frozenset(t.get("name") for t in listed or () if t.get("type") == "custom")

"""From a dialect-neutral request to the prompt text a model reads.

Messages arrive in the Hugging Face chat-template convention whatever the client's dialect:
``{"role", "content", "tool_calls": [{"id", "type": "function", "function": {"name", "arguments"}}],
"tool_call_id", "reasoning_content"}``. A template that knows about tools (Qwen, Llama 3, Hermes)
renders them itself. For one that does not (SmolLM2, plain ChatML), tools are described in the
system prompt and calls and results are written in the Hermes ``<tool_call>`` format, the same
format the output parser reads back.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from cortex.chat.tags import THINK_OPEN, TOOL_CLOSE, TOOL_OPEN
from cortex.chat.template import ChatTemplate


def render(
    template: ChatTemplate,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    thinking: bool | None,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The prompt text. ``tools``: [{"name", "description", "parameters"}]; ``thinking``: None
    leaves the model's default, False asks a thinking model not to think (Qwen3's switch)."""
    kwargs = dict(template_kwargs or {})
    if thinking is not None:
        kwargs.setdefault("enable_thinking", thinking)
    if tools and not template.knows_tools:
        return template.render(_inline_tools(messages, tools), **kwargs)
    hf_tools = [{"type": "function", "function": t} for t in tools] if tools else None
    return template.render(messages, tools=hf_tools, **kwargs)


def opens_in_reasoning(prompt: str) -> bool:
    """A template that ends its generation prompt with ``<think>`` has the model start inside it."""
    tail = prompt.rstrip()
    return tail.endswith(THINK_OPEN)


def _tool_preamble(tools: list[dict[str, Any]]) -> str:
    listing = "\n".join(json.dumps({"type": "function", "function": t}, ensure_ascii=False) for t in tools)
    return (
        "You may call one or more functions to help with the user's request. The functions are:\n"
        f"<tools>\n{listing}\n</tools>\n"
        "To call a function, reply with a JSON object with its name and arguments inside "
        f'{TOOL_OPEN}{TOOL_CLOSE} tags:\n{TOOL_OPEN}\n{{"name": <function-name>, "arguments": <args-object>}}\n{TOOL_CLOSE}'
    )


def call_text(call: dict[str, Any]) -> str:
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        with contextlib.suppress(ValueError):
            args = json.loads(args)
    return f"{TOOL_OPEN}\n{json.dumps({'name': fn.get('name'), 'arguments': args}, ensure_ascii=False)}\n{TOOL_CLOSE}"


def _inline_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    preamble = _tool_preamble(tools)
    if messages and messages[0]["role"] == "system":
        out.append({"role": "system", "content": f"{messages[0]['content']}\n\n{preamble}"})
        messages = messages[1:]
    else:
        out.append({"role": "system", "content": preamble})
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(call_text(c) for c in m["tool_calls"])
            text = f"{m.get('content') or ''}\n{calls}".lstrip("\n")
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            result = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + result  # parallel results share one turn
            else:
                out.append({"role": "user", "content": result, "tool_results": True})
        else:
            out.append(m)
    return [{k: v for k, v in m.items() if k != "tool_results"} for m in out]

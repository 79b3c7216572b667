"""OpenAI Responses API: POST /v1/responses, non-streamed and server-sent events.

What OpenAI's agent CLI and newer SDK code call instead of chat completions. The request is read
into the same dialect-neutral ``Submit`` as every other endpoint: ``instructions`` and the input
items become chat messages (a ``function_call`` item is an assistant turn's tool call, a
``function_call_output`` a tool message), flat function tools become the usual tools, and
``text.format`` the output's JSON schema. The answer is a list of output items: the reasoning
(``<think>``) as a ``reasoning`` item, the text as a ``message`` item, each tool call as a
``function_call`` item, in the order the model produced them.

Unless ``store`` is false (OpenAI's default is to store, and so is ours), the response and the
conversation that produced it are kept in the node's bounded store (cortex/api/response_store.py)
so that ``previous_response_id`` continues it: the new request's messages are the stored ones (its
input, then its output as an assistant turn) and then the new input; ``instructions`` are not
carried over, as OpenAI. An unknown or expired ``previous_response_id`` is a 400 naming it;
``conversation`` (the Conversations API) is refused with a 400. Built-in tools (web search, file
search, ...) and non-text input parts are refused by name.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal

import falcon
from msgspec import Meta, Struct

from cortex.api import sse
from cortex.api.bodies import Body, integer, num, opt
from cortex.api.engine_client import EngineClient, Generation
from cortex.api.errors import ApiError, bad_field
from cortex.api.generation import Choice, Done, Parts, Ping, client_id, collect, events, forwarded
from cortex.api.response_store import ResponseStore, owner_of
from cortex.api.validation import decode
from cortex.chat.output import Reasoning, Text, ToolCall
from rpc.engine import Finished, Submit
from rpc.messages import SamplingParams

ROLES = ("system", "developer", "user", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text")


class FormatSpec(Struct):
    """text (the default), json_object, or json_schema (the output follows ``schema``)."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class TextConfig(Struct):
    format: FormatSpec | None = None
    verbosity: str | None = None


class ReasoningConfig(Struct):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: str | None = None


class ResponsesRequest(Body, kw_only=True):
    """POST /v1/responses."""

    model: Annotated[str, Meta(description="A catalogue model id or alias (GET /v1/models).")]
    input: Annotated[
        str | list[dict[str, Any]],
        Meta(description="Text, or items: messages, function_call and function_call_output items."),
    ]
    instructions: opt(str, "A system message placed before the input.") = None
    stream: opt(bool) = False
    max_output_tokens: opt(integer(1), "Most tokens to generate, reasoning included.") = None
    temperature: opt(num(0, 2)) = 1.0
    top_p: opt(num(0, 1)) = 1.0
    tools: opt(list[dict[str, Any]], "Function tools: {type: function, name, description, parameters}.") = None
    tool_choice: opt(str | dict[str, Any], "none, auto, required, or {type: function, name}.") = None
    parallel_tool_calls: opt(bool) = True
    text: opt(TextConfig) = None
    reasoning: opt(ReasoningConfig) = None
    metadata: opt(dict[str, str]) = None
    previous_response_id: opt(str, "A stored response whose conversation this request continues.") = None
    conversation: opt(str | dict[str, Any], "Not supported: use previous_response_id.") = None
    store: opt(bool, "Keep the response (bounded, with a TTL) for GET and previous_response_id.") = True
    include: opt(list[str], "Accepted and ignored.") = None
    user: opt(str) = None
    seed: opt(integer(), "Same seed, same output.") = None


# -- the request -------------------------------------------------------------------------------------


def parse_input(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The input items as chat messages in the template convention (``instructions`` apart)."""
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}]
    if not body.input:
        raise bad_field("input", "'input' must contain at least one item.")
    return parse_items(body.input, "input")


def parse_items(items: list[dict[str, Any]], at: str) -> list[dict[str, Any]]:
    """Input or output items as chat messages; reasoning items are dropped."""
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"{at}[{i}]"
        if not isinstance(item, dict):
            raise bad_field(where, f"Invalid type for '{where}': expected an object.")
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            _add_call(messages, item, where)
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", where)
            messages.append({"role": "tool", "tool_call_id": call_id, "content": _output_text(item, where)})
        elif kind == "reasoning":
            continue  # earlier reasoning: the chat templates drop it from the prompt anyway
        else:
            raise bad_field(f"{where}.type", f"Input item type {kind!r} is not supported.")
    return messages


def history(body: ResponsesRequest, store: ResponseStore, owner: str) -> list[dict[str, Any]]:
    """The conversation ``previous_response_id`` names (its messages, if ``owner``'s), or none."""
    if body.conversation is not None:
        raise bad_field("conversation", "'conversation' is not supported; use 'previous_response_id'.")
    if body.previous_response_id is None:
        return []
    found = store.get(body.previous_response_id, owner)
    if found is None:
        message = f"Previous response with id '{body.previous_response_id}' not found."
        raise ApiError(400, message, code="previous_response_not_found", param="previous_response_id")
    return found[1]


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


def parse_tools(body: ResponsesRequest) -> tuple[list[dict] | None, str, str | None]:
    """(tools as {"name", "description", "parameters"}, tool_choice none|auto|required, forced name)."""
    tools = []
    for i, t in enumerate(body.tools or []):
        kind = t.get("type")
        if kind != "function":
            raise bad_field(f"tools[{i}].type", f"Tool type {kind!r} is not supported; only function tools are.")
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise bad_field(f"tools[{i}].name", f"Invalid tool at 'tools[{i}]': expected a function with a name.")
        params = t.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise bad_field(f"tools[{i}].parameters", "Function parameters must be a JSON schema object.")
        tools.append({"name": name, "description": t.get("description") or "", "parameters": params})
    choice = body.tool_choice
    if choice is None:
        return tools or None, "auto", None
    if choice in ("none", "auto", "required"):
        return tools or None, choice, None
    name = choice.get("name") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(name, str):
        raise bad_field("tool_choice", "'tool_choice' must be none, auto, required or {type: function, name}.")
    if name not in {t["name"] for t in tools}:
        raise bad_field("tool_choice", f"Tool choice names function '{name}', which is not in 'tools'.")
    return tools, "required", name


def parse_format(body: ResponsesRequest) -> dict | None:
    fmt = body.text.format if body.text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {}
    if fmt.schema is None:
        raise bad_field("text.format.schema", "'text.format.schema' must be a JSON schema object.")
    return fmt.schema


def to_submit(body: ResponsesRequest, req: falcon.Request, conversation: list[dict[str, Any]]) -> Submit:
    """``conversation``: the earlier messages and this input's, without ``instructions``."""
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    tools, tool_choice, tool_name = parse_tools(body)
    effort = body.reasoning.effort if body.reasoning else None
    return Submit(
        request_id=f"resp_{uuid.uuid4().hex}",
        model=body.model,
        messages=system + conversation,
        sampling=SamplingParams(temperature=body.temperature, top_p=body.top_p, seed=body.seed),
        max_tokens=body.max_output_tokens,
        client=client_id(req),
        tools=tools,
        tool_choice=tool_choice,
        tool_name=tool_name,
        parallel_tool_calls=body.parallel_tool_calls,
        json_schema=parse_format(body),
        thinking=None if effort is None else effort != "none",
        hop=forwarded(req),
    )


# -- the answer ----------------------------------------------------------------------------------------


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _reasoning_item(item_id: str, text: str, status: str) -> dict:
    return {
        "type": "reasoning",
        "id": item_id,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": status,
    }


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str | None, status: str) -> dict:
    content = [] if text is None else [_text_part(text)]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _call_item(item_id: str, call: ToolCall, arguments: str, status: str) -> dict:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": _id("call"),
        "name": call.name,
        "arguments": arguments,
        "status": status,
    }


def output_items(choice: Choice) -> list[dict]:
    """A whole answer's parts as output items; consecutive parts of one kind make one item."""
    items: list[dict] = []
    for part in choice.parts:
        last = items[-1] if items else None
        if isinstance(part, Reasoning):
            if last and last["type"] == "reasoning":
                last["content"][0]["text"] += part.text
            else:
                items.append(_reasoning_item(_id("rs"), part.text, "completed"))
        elif isinstance(part, Text):
            if last and last["type"] == "message":
                last["content"][0]["text"] += part.text
            else:
                items.append(_message_item(_id("msg"), part.text, "completed"))
        else:
            items.append(_call_item(_id("fc"), part, part.arguments_json, "completed"))
    return items


def _usage(f: Finished) -> dict:
    return {
        "input_tokens": f.prompt_tokens,
        "input_tokens_details": {"cached_tokens": f.cached_tokens},
        "output_tokens": f.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},  # not counted apart from the answer here
        "total_tokens": f.prompt_tokens + f.completion_tokens,
    }


class _Shell:
    """The response object's fields that say what was asked, the same in every event."""

    def __init__(self, body: ResponsesRequest, submit: Submit, store: bool):
        self.id, self.created = submit.request_id, int(time.time())
        self.fields = {
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "metadata": body.metadata or {},
            "model": body.model,
            "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": body.reasoning.effort if body.reasoning else None, "summary": None},
            "store": store,
            "temperature": body.temperature,
            "text": {"format": {"type": body.text.format.type if body.text and body.text.format else "text"}},
            "tool_choice": _tool_choice(body.tool_choice),
            "tools": body.tools or [],
            "top_p": body.top_p,
            "truncation": "disabled",
            "user": body.user,
        }

    def response(self, status: str, output: list[dict], finished: Finished | None = None) -> dict:
        out = {"id": self.id, "object": "response", "created_at": self.created, "status": status, "error": None}
        out["incomplete_details"] = {"reason": "max_output_tokens"} if status == "incomplete" else None
        out.update(self.fields)
        out["output"] = output
        out["usage"] = _usage(finished) if finished else None
        return out


def _tool_choice(choice: str | dict | None) -> str | dict:
    return choice if choice is not None else "auto"


def _status(finished: Finished) -> str:
    return "incomplete" if finished.finish_reason == "length" else "completed"


class Responses:
    def __init__(self, engine: EngineClient, max_body_bytes: int, keepalive_s: float, store: ResponseStore):
        self.engine, self.max_body_bytes, self.keepalive_s = engine, max_body_bytes, keepalive_s
        self.store = store

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = decode(req, ResponsesRequest, self.max_body_bytes)
        owner = owner_of(req)
        conversation = history(body, self.store, owner) + parse_input(body)
        submit = to_submit(body, req, conversation)
        keep = body.store is not False and self.store.enabled
        shell = _Shell(body, submit, keep)

        def done(response: dict) -> None:  # the conversation so far, with this answer as an assistant turn
            if keep:
                messages = conversation + parse_items(response["output"], "output")
                self.store.put(response["id"], response, messages, owner)

        gen = self.engine.submit(submit, req.context.get("record"))  # 404, 400 too long, 429/503 up front
        tools = bool(submit.tools) and submit.tool_choice != "none"
        if body.stream:
            resp.content_type = "text/event-stream"
            resp.set_headers(sse.HEADERS)
            resp.stream = _Stream(shell, self.keepalive_s, done).run(gen, tools)
            return
        choice = collect(gen, req, tools=tools)[0]
        resp.media = shell.response(_status(choice.finished), output_items(choice), choice.finished)
        done(resp.media)


class _Stream:
    """Parts as Responses events: each output item opens, takes its deltas, and closes before the
    next one opens; every event carries its sequence number."""

    def __init__(self, shell: _Shell, keepalive_s: float, done: Callable[[dict], None]):
        self.shell, self.keepalive_s, self.done = shell, keepalive_s, done
        self.seq = 0
        self.items: list[dict] = []  # closed items, as the final response lists them
        self.open: dict | None = None  # the item taking deltas
        self.text = ""

    def emit(self, kind: str, **data: Any) -> bytes:
        event = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return sse.named(kind, event)

    def run(self, gen: Generation, tools: bool) -> Iterator[bytes]:
        try:
            yield self.emit("response.created", response=self.shell.response("in_progress", []))
            yield self.emit("response.in_progress", response=self.shell.response("in_progress", []))
            for ev in events(gen, keepalive_s=self.keepalive_s, tools=tools):
                if isinstance(ev, Ping):
                    yield sse.KEEPALIVE
                elif isinstance(ev, Parts):
                    for part in ev.parts:
                        yield from self.write(part)
                elif isinstance(ev, Done):
                    yield from self.close()
                    status = _status(ev.finished)
                    final = self.shell.response(status, self.items, ev.finished)
                    self.done(final)  # stored before the client reads the end, so it can continue at once
                    yield self.emit(f"response.{status}", response=final)
        except ApiError as err:  # mid-stream: the error, then the response as failed
            yield self.emit("error", code=err.code, message=err.message, param=err.param)
            failed = self.shell.response("failed", self.items)
            failed["error"] = {"code": err.code or "server_error", "message": err.message}
            yield self.emit("response.failed", response=failed)
        finally:
            gen.close()  # a client that went away cancels its request

    def write(self, part: Text | Reasoning | ToolCall) -> Iterator[bytes]:
        if isinstance(part, ToolCall):
            yield from self.close()
            yield from self._call(part)
            return
        kind = "reasoning" if isinstance(part, Reasoning) else "message"
        if self.open is None or self.open["type"] != kind:
            yield from self.close()
            yield from self._start(kind)
        self.text += part.text
        where = {"item_id": self.open["id"], "output_index": len(self.items), "content_index": 0}
        if kind == "reasoning":
            yield self.emit("response.reasoning_text.delta", **where, delta=part.text)
        else:
            yield self.emit("response.output_text.delta", **where, delta=part.text, logprobs=[])

    def _start(self, kind: str) -> Iterator[bytes]:
        index = len(self.items)
        if kind == "reasoning":
            self.open = {**_reasoning_item(_id("rs"), "", "in_progress"), "content": []}
            yield self.emit("response.output_item.added", output_index=index, item=self.open)
        else:
            self.open = _message_item(_id("msg"), None, "in_progress")
            yield self.emit("response.output_item.added", output_index=index, item=self.open)
            where = {"item_id": self.open["id"], "output_index": index, "content_index": 0}
            yield self.emit("response.content_part.added", **where, part=_text_part(""))
        self.text = ""

    def close(self) -> Iterator[bytes]:
        if self.open is None:
            return
        index, item_id = len(self.items), self.open["id"]
        where = {"item_id": item_id, "output_index": index, "content_index": 0}
        if self.open["type"] == "reasoning":
            yield self.emit("response.reasoning_text.done", **where, text=self.text)
            item = _reasoning_item(item_id, self.text, "completed")
        else:
            yield self.emit("response.output_text.done", **where, text=self.text, logprobs=[])
            yield self.emit("response.content_part.done", **where, part=_text_part(self.text))
            item = _message_item(item_id, self.text, "completed")
        yield self.emit("response.output_item.done", output_index=index, item=item)
        self.items.append(item)
        self.open = None

    def _call(self, call: ToolCall) -> Iterator[bytes]:
        index, item_id, args = len(self.items), _id("fc"), call.arguments_json
        added = _call_item(item_id, call, "", "in_progress")
        yield self.emit("response.output_item.added", output_index=index, item=added)
        yield self.emit("response.function_call_arguments.delta", item_id=item_id, output_index=index, delta=args)
        yield self.emit("response.function_call_arguments.done", item_id=item_id, output_index=index, arguments=args)
        item = {**added, "arguments": args, "status": "completed"}
        yield self.emit("response.output_item.done", output_index=index, item=item)
        self.items.append(item)

"""Chat templates: the model's own Jinja template, rendered in a sandbox.

Templates come from ``chat_template.jinja``, ``tokenizer_config.json`` or GGUF metadata; they are
untrusted input (a model file is data), hence the sandboxed environment.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cortex.chat.tags import FUNCTION_OPEN


class TemplateRenderError(ValueError):
    """The template refused the conversation (e.g. ``raise_exception`` on a role order)."""


def _raise(message: str) -> None:
    raise TemplateRenderError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        self.source = source
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""
        # a template that reads `tools` renders tool definitions, calls and results itself
        self.knows_tools = "tools" in source
        # how it asks the model to write a call: XML parameters (Qwen3.5, Qwen3-Coder) or JSON (Hermes)
        self.call_format = "xml" if self.knows_tools and FUNCTION_OPEN in source else "json"

    def render(self, messages: list[dict[str, Any]], tools: list[dict] | None = None, **kwargs: Any) -> str:
        try:
            return self.template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **kwargs,
            )
        except TemplateRenderError:
            raise
        except TemplateError as exc:
            raise TemplateRenderError(f"chat template failed: {exc}") from None
        except Exception as exc:  # templates are code from a model file; any error is the input's fault
            raise TemplateRenderError(f"chat template failed: {type(exc).__name__}: {exc}") from None


# Used when a model ships no template at all.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

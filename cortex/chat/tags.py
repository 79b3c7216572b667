"""The tags open models write around reasoning and tool calls (Qwen3, Qwen3.5, DeepSeek-R1, Hermes).

A tool call's body is JSON (Hermes, Qwen3: ``{"name": ..., "arguments": {...}}``) or XML parameters
(Qwen3.5, Qwen3-Coder: ``<function=NAME>`` then a ``<parameter=KEY>`` block per argument, its value
on the lines between)."""

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
FUNCTION_OPEN, FUNCTION_CLOSE = "<function=", "</function>"
PARAMETER_OPEN, PARAMETER_CLOSE = "<parameter=", "</parameter>"

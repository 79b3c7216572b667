"""The tags open models write around reasoning and tool calls (Qwen3, DeepSeek-R1, Hermes)."""

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"

"""cortex: one OpenAI + Anthropic compatible endpoint for a fleet of local LLM hosts."""

__version__ = "0.1.0"

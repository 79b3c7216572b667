"""One generation request as the engine sees it."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from cortex.chat.detokenizer import IncrementalDecoder
from rpc.messages import SamplingParams

_seq_ids = itertools.count(1)


@dataclass
class Sequence:
    request_id: str
    peer: bytes  # the front connection that waits for this request's events
    model_id: str
    prompt: list[int]
    sampling: SamplingParams
    max_tokens: int
    decoder: IncrementalDecoder
    eos_ids: frozenset[int]
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    output: list[int] = field(default_factory=list)
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)

    @property
    def cached(self) -> int:
        """Tokens the worker holds KV for: the prompt and every output token but the last."""
        return len(self.prompt) + max(len(self.output) - 1, 0) if self.output else 0

    def next_input(self) -> tuple[list[int], int]:
        """Tokens to feed in the next step and the position they start at."""
        if not self.output:
            return self.prompt, 0
        return [self.output[-1]], len(self.prompt) + len(self.output) - 1

    def append(self, token: int) -> tuple[str, str | None]:
        """Add a sampled token; return (text to emit, finish reason or None)."""
        self.output.append(token)
        if token in self.eos_ids:
            return self.decoder.flush(), "stop"
        text = self.decoder.push(token)
        if self.decoder.stopped:
            return text, "stop"
        if len(self.output) >= self.max_tokens:
            return text + self.decoder.flush(), "length"
        return text, None

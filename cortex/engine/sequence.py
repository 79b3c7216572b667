"""One generation request as the engine sees it."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from cortex.chat.detokenizer import IncrementalDecoder
from cortex.engine.constraint import Constraint
from rpc.messages import SamplingParams

_seq_ids = itertools.count(1)


@dataclass
class Sequence:
    request_id: str
    peer: bytes  # the front connection that waits for this request's events
    model_id: str
    prompt_len: int
    tokens: list[int]  # the prompt, then every sampled token
    sampling: SamplingParams
    max_tokens: int
    decoder: IncrementalDecoder
    eos_ids: frozenset[int]
    client: str = ""
    index: int = 0  # which of its request's n choices
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    block_table: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose keys and values are in the KV cache
    state_slot: int = -1  # hybrid models: the recurrent state slot it holds while running
    restore_slot: int = -1  # hybrid models: a saved state its first step starts from (a prefix hit)
    checkpoint_at: int = 0  # hybrid models: the prompt position whose state is saved (0: none)
    cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    block_digests: list[bytes] = field(default_factory=list)  # digest chain of its filled blocks (blocks.py)
    admitted: bool = False
    computed_once: bool = False  # a step of it has run: the workers know its prompt
    pending_logprobs: list[dict] = field(default_factory=list)  # logprob entries not yet sent
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)
    constraint: Constraint | None = None  # grammar the output must follow (JSON schema, tool calls)
    cache_salt: bytes = b""  # prompts share cached KV blocks only with requests of the same salt
    # monotonic times for the metrics: first step, first and latest sampled token
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.request_id}#{self.index}"

    @property
    def output_len(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def pending(self) -> int:
        """Tokens still to feed before the next one can be sampled (1 while decoding)."""
        return len(self.tokens) - self.computed

    def append(self, token: int) -> tuple[str, str | None]:
        """Add a sampled token; return (text to emit, finish reason or None)."""
        self.tokens.append(token)
        if token in self.eos_ids:
            return self.decoder.flush(), "stop"
        text = self.decoder.push(token)
        if self.decoder.stopped:
            return text, "stop"
        if self.output_len >= self.max_tokens:
            return text + self.decoder.flush(), "length"
        return text, None

"""Incremental, UTF-8-safe detokenization with stop strings that never reach the client."""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class IncrementalDecoder:
    """Feed token ids one by one; get back text that is safe to emit.

    A token can end inside a multi-byte character (DecodeStream then returns None until it is
    complete), and a stop string can span tokens: text that could still be the start of a stop
    string is held back until it is known not to be.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None):
        self._tok = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._stop = [s for s in (stop or []) if s]
        self._pending = ""  # decoded, not yet emitted
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the output

    def push(self, token_id: int) -> str:
        piece = self._stream.step(self._tok, token_id) or ""
        self._pending += piece
        if not self._stop:
            out, self._pending = self._pending, ""
            return out
        hits = [(self._pending.find(s), s) for s in self._stop if s in self._pending]
        if hits:
            at, self.matched = min(hits)
            self.stopped = True
            out, self._pending = self._pending[:at], ""
            return out
        keep = self._held_tail()
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        return out

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

    def _held_tail(self) -> int:
        """Length of the longest suffix of pending text that is a prefix of some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(s[:n]):
                    best = n
                    break
        return best

"""Per-client limits: requests in flight and tokens per minute, so one key cannot starve the others.

A client is an API key (the front names it by a hash of the key, ``cortex.api.auth.key_id``) or an
address. Each may have requests in flight up to its key's ``max_concurrent`` (from the keys file),
else ``[engine] max_requests_per_client``; and a key with ``tokens_per_minute`` may use that many
prompt and generated tokens over any minute. Beyond either, admission answers 429 with the seconds
after which a retry can pass. Prompt tokens are charged when a request is admitted, generated ones
when each choice ends (so a long stream counts once it is done, not token by token on the loop).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from cortex.api.auth import key_id
from cortex.config import Config

WINDOW_S = 60.0


@dataclass
class _Meter:
    """Tokens a client used over the last minute: (when, how many) entries, and their sum."""

    entries: deque[tuple[float, int]] = field(default_factory=deque)
    total: int = 0

    def expire(self, now: float) -> None:
        while self.entries and self.entries[0][0] <= now - WINDOW_S:
            self.total -= self.entries.popleft()[1]

    def seconds_until_below(self, limit: int, now: float) -> int:
        """Seconds until the window holds fewer than ``limit`` tokens (at least 1)."""
        left = self.total
        for when, n in self.entries:
            left -= n
            if left < limit:
                return max(1, math.ceil(when + WINDOW_S - now))
        return 1


class ClientLimits:
    def __init__(self, cfg: Config) -> None:
        self.meters: dict[str, _Meter] = {}
        self.configure(cfg)

    def configure(self, cfg: Config) -> None:
        """(Re)read the limits: at start-up and on reload. Meters of clients still limited carry on."""
        self.default_concurrent = cfg.engine.max_requests_per_client
        self.by_client = {key_id(key): limit for key, limit in cfg.key_limits.items()}
        self.meters = {c: m for c, m in self.meters.items() if self.tokens_per_minute(c)}

    def max_concurrent(self, client: str) -> int:
        limit = self.by_client.get(client)
        return limit.max_concurrent if limit and limit.max_concurrent else self.default_concurrent

    def tokens_per_minute(self, client: str) -> int:
        limit = self.by_client.get(client)
        return limit.tokens_per_minute if limit else 0

    def refusal(self, client: str, in_flight: int, now: float | None = None) -> tuple[str, int] | None:
        """(message, retry after seconds) when ``client`` may not start another request now."""
        if not client:
            return None
        most = self.max_concurrent(client)
        if most and in_flight >= most:
            return f"this client already has {most} requests in flight; retry when one finishes", 1
        per_minute = self.tokens_per_minute(client)
        meter = self.meters.get(client)
        if per_minute and meter is not None:
            now = time.monotonic() if now is None else now
            meter.expire(now)
            if meter.total >= per_minute:
                wait = meter.seconds_until_below(per_minute, now)
                return f"this API key used {meter.total} of its {per_minute} tokens per minute; retry in {wait}s", wait
        return None

    def charge(self, client: str, tokens: int, now: float | None = None) -> None:
        """Count ``tokens`` (prompt or generated) against a metered client."""
        if not client or tokens <= 0 or not self.tokens_per_minute(client):
            return
        now = time.monotonic() if now is None else now
        meter = self.meters.setdefault(client, _Meter())
        meter.expire(now)
        meter.entries.append((now, tokens))
        meter.total += tokens

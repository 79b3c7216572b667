"""How long a step takes for the work in it, learnt from the steps themselves, and how much prompt
fits in a step that must stay short.

A running stream waits for every step its model takes, so a step that carries a big prompt chunk
is a pause in every stream. ``[engine] step_target_ms`` bounds it: while sequences decode, each
step gets only as much prefill as is predicted to fit in that time. The prediction is a line,
``seconds = fixed + per_unit * units``, fitted to the model's own recent steps (no per-device
table to keep): ``fixed`` from steps that only decode, ``per_unit`` from steps that also prefill.

A *unit* is the cost of one token through the linear layers. Attention adds to each token a cost
that grows with its position: a token at position ``p`` costs ``1 + p / k`` units, where ``k``
(``attention_span_equivalent``) is the context at which a token's attention costs as much as its
linear layers, from the model's shape. So a prompt's chunks shrink as its context grows, and the
last chunk of a long prompt no longer stalls everyone for the whole prompt's attention.
"""

from __future__ import annotations

import math

from workers.arch.config import ModelConfig

PROBE_UNITS = 16.0  # prefill beside decodes before any prefill step was timed, and at least this always
SMOOTHING = 0.3  # weight of the newest step in the running estimates


def attention_span_equivalent(config: ModelConfig) -> float:
    """Context length at which one token's attention costs as much as its linear layers.

    Per layer and token, the projections and the MLP take ``hidden * head_dim * (2 heads + 2 kv)
    + 3 * hidden * intermediate`` multiply-adds; attention takes ``2 * heads * head_dim`` per
    position attended (scores, then the weighted sum of values)."""
    c = config
    linear = (
        c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * c.hidden_size * c.intermediate_size
    )
    return linear / (2 * c.num_heads * c.head_dim)


def units(n_tokens: int, start: int, k: float) -> float:
    """Cost of tokens ``start .. start + n_tokens - 1`` of one sequence, in linear-token units."""
    return n_tokens * (1 + (start + (n_tokens - 1) / 2) / k)


def tokens_within(allowance: float, start: int, k: float) -> int:
    """The most tokens from position ``start`` whose cost stays within ``allowance`` units; at
    least one, so a prompt always makes progress."""
    if allowance <= 0:
        return 1
    b = 1 + (start - 0.5) / k  # units(n) = n * b + n^2 / (2k) = allowance, solved for n
    n = max(1, int(2 * allowance / (b + math.sqrt(b * b + 2 * allowance / k))))  # stable for large k
    while n > 1 and units(n, start, k) > allowance:  # float rounding, either way
        n -= 1
    while units(n + 1, start, k) <= allowance:
        n += 1
    return n


class StepClock:
    def __init__(self) -> None:
        self.fixed_s: float | None = None  # a decode-only step of the current batch
        self.per_unit_s: float | None = None  # each prefill unit added to a step

    def observe(self, prefill_units: float, seconds: float) -> None:
        if prefill_units <= 0:
            self.fixed_s = _blend(self.fixed_s, seconds)
        elif self.fixed_s is not None:
            self.per_unit_s = _blend(self.per_unit_s, max(seconds - self.fixed_s, 1e-6) / prefill_units)

    def prefill_allowance(self, target_s: float) -> float | None:
        """Prefill units that fit in a step of ``target_s`` beside the decodes; None while unknown."""
        if self.fixed_s is None or self.per_unit_s is None:
            return None
        return (target_s - self.fixed_s) / self.per_unit_s


def _blend(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new

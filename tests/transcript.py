"""What a golden transcript promises, and the one helper that checks it.

A transcript is a server-sent event stream. Its promise is the API's: the events, their names and
order, every field name and its order, ids (once normalised), finish reasons, token counts and text
are exact. Computed floating-point values (logprobs) depend on which CPU kernels torch and our own
kernels picked on this machine (AVX2, AVX-512, ...), so they are compared within ``FLOAT_ABS_TOL``.

The tolerance is far above the cross-machine noise (5e-5 measured between an AVX2 and an AVX-512
machine on SmolLM2's logprobs) and far below a change anyone would call a different answer (0.01).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

FLOAT_ABS_TOL = 1e-3


@dataclass(frozen=True)
class Event:
    """One server-sent event: its ``event:`` name (None when absent) and its ``data:`` payload,
    parsed as JSON where it is JSON (``[DONE]`` stays a string)."""

    name: str | None
    data: object


def parse_sse(text: str) -> list[Event]:
    """The events of a stream; comments (``: keep-alive``) are not events."""
    events = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        name, data = None, []
        for line in lines:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
            else:
                raise AssertionError(f"not a server-sent event field: {line!r}")
        payload = "\n".join(data)
        try:
            parsed = json.loads(payload)
        except json.JSONDecodeError:
            parsed = payload
        events.append(Event(name, parsed))
    return events


def mismatch(got: object, want: object, path: str = "$", tol: float = FLOAT_ABS_TOL) -> str | None:
    """Where ``got`` breaks the promise of ``want`` (a JSON path and both values), or None.

    Dicts must have the same keys in the same order; lists the same length; strings, booleans,
    None and integers must be equal; floats must be floats within ``tol`` of each other."""
    if isinstance(want, bool) or want is None or isinstance(want, str):
        return None if type(got) is type(want) and got == want else f"{path}: {got!r} != {want!r}"
    if isinstance(want, int):
        return None if type(got) is int and got == want else f"{path}: {got!r} != {want!r}"
    if isinstance(want, float):
        if type(got) is not float or not math.isclose(got, want, rel_tol=0, abs_tol=tol):
            return f"{path}: {got!r} != {want!r} (tolerance {tol})"
        return None
    if isinstance(want, dict):
        if not isinstance(got, dict) or list(got) != list(want):
            keys = list(got) if isinstance(got, dict) else type(got).__name__
            return f"{path}: keys {keys} != {list(want)}"
        for key in want:
            if found := mismatch(got[key], want[key], f"{path}.{key}", tol):
                return found
        return None
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return f"{path}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            if found := mismatch(g, w, f"{path}[{i}]", tol):
                return found
        return None
    raise TypeError(f"{path}: not a JSON value: {want!r}")


def assert_transcript_matches(got: str, want: str, label: str) -> None:
    """``got`` keeps ``want``'s promise (see the module docstring); the message names the first
    event and field that breaks it."""
    got_events, want_events = parse_sse(got), parse_sse(want)
    got_names, want_names = [e.name for e in got_events], [e.name for e in want_events]
    assert len(got_events) == len(want_events), f"{label}: {len(got_events)} events, want {len(want_events)}"
    assert got_names == want_names, f"{label}: events {got_names}, want {want_names}"
    for i, (g, w) in enumerate(zip(got_events, want_events, strict=True)):
        found = mismatch(g.data, w.data, f"event[{i}].data")
        assert found is None, f"{label}: {found}"

"""The golden-transcript check (tests/transcript.py) says what the API promises: one character of
text or 0.01 of a logprob is a different answer; a CPU's last-digit rounding is not."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.transcript import FLOAT_ABS_TOL, assert_transcript_matches, mismatch, parse_sse

GOLDEN = sorted((Path(__file__).parent / "golden").glob("*/*.sse"))
LOGPROB = re.compile(r'"logprob":(-?[0-9.e-]+)')


def _shift_logprobs(text: str, by: float) -> str:
    return LOGPROB.sub(lambda m: f'"logprob":{float(m.group(1)) + by!r}', text)


TEXT_FIELDS = ("content", "text", "thinking", "partial_json", "reasoning_content", "arguments")


def _render(events) -> str:
    out = []
    for e in events:
        data = e.data if isinstance(e.data, str) else json.dumps(e.data, separators=(",", ":"))
        out.append((f"event: {e.name}\n" if e.name else "") + f"data: {data}\n\n")
    return "".join(out)


def _change_first_text(node) -> bool:
    """Changes the first character of the first non-empty generated text in ``node``, in place."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        if key in TEXT_FIELDS and isinstance(value, str) and value:
            node[key] = ("x" if value[0] != "x" else "y") + value[1:]
            return True
        if _change_first_text(value):
            return True
    return False


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_a_golden_matches_itself_and_not_one_character_more(path):
    text = path.read_text()
    assert_transcript_matches(text, text, path.name)
    events = parse_sse(text)
    assert_transcript_matches(_render(events), text, path.name)  # the same events, however written
    assert any(_change_first_text(e.data) for e in events), f"{path.name} has no generated text"
    with pytest.raises(AssertionError):
        assert_transcript_matches(_render(events), text, path.name)


@pytest.mark.parametrize("path", [p for p in GOLDEN if LOGPROB.search(p.read_text())], ids=lambda p: p.stem)
def test_logprobs_match_within_the_tolerance_and_no_further(path):
    text = path.read_text()
    assert_transcript_matches(_shift_logprobs(text, 5e-5), text, path.name)  # AVX2 vs AVX-512 noise
    assert_transcript_matches(_shift_logprobs(text, -FLOAT_ABS_TOL / 2), text, path.name)
    with pytest.raises(AssertionError, match="logprob"):
        assert_transcript_matches(_shift_logprobs(text, 0.01), text, path.name)


def test_structure_ids_counts_and_types_are_exact():
    want = {"id": "chatcmpl-ID", "usage": {"prompt_tokens": 3, "completion_tokens": 2}, "p": -1.5, "x": None}
    assert mismatch(dict(want), want) is None
    assert "keys" in mismatch({k: want[k] for k in reversed(want)}, want)  # field order is part of it
    assert "keys" in mismatch({**want, "extra": 1}, want)
    assert "prompt_tokens" in mismatch({**want, "usage": {"prompt_tokens": 4, "completion_tokens": 2}}, want)
    assert mismatch({**want, "usage": {"prompt_tokens": 3.0, "completion_tokens": 2}}, want)  # int is not float
    assert mismatch({**want, "p": -1}, want)  # a float stays a float
    assert mismatch({**want, "x": False}, want)
    assert mismatch({**want, "id": "chatcmpl-XD"}, want)


def test_events_names_order_and_count_are_exact():
    a = 'event: a\ndata: {"n":1}\n\nevent: b\ndata: {"n":2}\n\n'
    assert [e.name for e in parse_sse(a)] == ["a", "b"]
    assert parse_sse(": keep-alive\n\ndata: [DONE]\n\n")[0].data == "[DONE]"
    with pytest.raises(AssertionError):
        assert_transcript_matches('event: b\ndata: {"n":2}\n\nevent: a\ndata: {"n":1}\n\n', a, "order")
    with pytest.raises(AssertionError):
        assert_transcript_matches('event: a\ndata: {"n":1}\n\n', a, "count")
    assert json.loads('{"n":1}') == parse_sse(a)[0].data

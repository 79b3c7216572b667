"""bench/soak.py reads each streamed answer by its events: an error event is an error, a stream that
stops before its dialect's last event is cut, and a token whose text happens to be ``error`` is
text. (The 30-minute soak once counted a stream as an unreadable error; its classifier then looked
for the characters ``"error"`` anywhere, which a delta whose content is the token ``error`` has.)"""

from __future__ import annotations

import json

from bench.soak import stream_outcome


def _openai(*contents: str, done: bool = True) -> str:
    chunks = [{"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": c}}]} for c in contents]
    lines = [f"data: {json.dumps(c, separators=(',', ':'), ensure_ascii=False)}\n\n" for c in chunks]
    return "".join(lines) + ("data: [DONE]\n\n" if done else "")


def _anthropic(*texts: str, stop: bool = True) -> str:
    events = [("message_start", {"type": "message_start", "message": {"id": "msg_1", "content": []}})]
    events += [("content_block_delta", {"type": "content_block_delta", "delta": {"text": t}}) for t in texts]
    events += [("message_stop", {"type": "message_stop"})] if stop else []
    return "".join(f"event: {name}\ndata: {json.dumps(body)}\n\n" for name, body in events)


def test_a_token_whose_text_is_error_is_an_answer_not_an_error():
    assert '"error"' in _openai("The ", "error")  # what the old classifier looked for
    assert stream_outcome(_openai("The ", "error")) == "ok"
    assert stream_outcome(_anthropic("error", " was")) == "ok"


def test_a_token_with_a_unicode_line_separator_does_not_cut_its_event():
    stream = _openai("a\u2028b")  # as the server writes it: ensure_ascii=False leaves U+2028 raw
    assert "\u2028" in stream
    assert stream_outcome(stream) == "ok"


def test_error_events_are_errors_with_their_code_in_both_dialects():
    openai = (
        _openai("Hi", done=False)
        + 'data: {"error": {"message": "x", "type": "server_error", "code": "worker_failed"}}\n\n'
    )
    assert stream_outcome(openai + "data: [DONE]\n\n") == "stream-error-worker_failed"
    anthropic = _anthropic("Hi", stop=False)
    anthropic += 'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "x"}}\n\n'
    assert stream_outcome(anthropic) == "stream-error-overloaded_error"


def test_a_stream_that_stops_before_its_last_event_is_cut():
    assert stream_outcome(_openai("Hi", done=False)) == "stream-cut"
    assert stream_outcome(_anthropic("Hi", stop=False)) == "stream-cut"
    assert stream_outcome("data: {not json\n\n") == "stream-unreadable"

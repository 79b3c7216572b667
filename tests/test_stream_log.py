"""The request log of a stream the client leaves: logged as 499 with the prompt's tokens and the
tokens generated so far (not 0), in every dialect that streams. And a context overflow's texts,
made from the failure's numbers rather than read back from a message."""

from __future__ import annotations

import json

import httpx
import pytest

from cortex.api.errors import ApiError
from rpc.engine import ContextOverflow, FailureKind
from tests.conftest import Server, tiny_models_toml, wait_for

HI = [{"role": "user", "content": "Hello, world! How are you today?"}]
MAX_TOKENS = 1500  # far more than the client reads before it leaves


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_qwen3):
    root = tmp_path_factory.mktemp("streamlog")
    # 20 ms a step: the stream is still running when the client leaves
    env = {"CORTEX_TEST_STEP_DELAY_S": "0.02"}
    server = Server(root, tiny_models_toml(tiny_qwen3), '[logging]\nformat = "json"\n', env=env)
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


def _log_line(srv: Server, request_id: str) -> dict | None:
    for raw in (srv.root / "serve.log").read_text(errors="replace").splitlines():
        if raw.startswith("{") and request_id in raw:
            line = json.loads(raw)
            if line.get("logger") == "cortex.request":
                return line
    return None


def _prompt_tokens(srv: Server) -> int:
    body = {"model": "tiny", "messages": HI, "max_tokens": 1}
    return httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120).json()["usage"]["prompt_tokens"]


# each dialect: (path, body, the request id from a data line or None, whether a data line carries a token)
def _chat_id(event: dict) -> str | None:
    return event.get("id")


def _messages_id(event: dict) -> str | None:
    return event["message"]["id"] if event.get("type") == "message_start" else None


def _responses_id(event: dict) -> str | None:
    return event["response"]["id"] if event.get("type") == "response.created" else None


DIALECTS = {
    "chat": ("/v1/chat/completions", {"messages": HI, "max_tokens": MAX_TOKENS}, _chat_id),
    "messages": ("/v1/messages", {"messages": HI, "max_tokens": MAX_TOKENS}, _messages_id),
    "responses": ("/v1/responses", {"input": HI, "max_output_tokens": MAX_TOKENS}, _responses_id),
}


@pytest.mark.parametrize("dialect", list(DIALECTS))
def test_a_stream_the_client_leaves_is_logged_with_the_tokens_so_far(srv, dialect):
    path, body, id_of = DIALECTS[dialect]
    body = {"model": "tiny", "stream": True, "ignore_eos": True, "temperature": 0, **body}
    if dialect != "chat":
        body.pop("ignore_eos")  # chat's extension; the others run to their max by the step delay alone
    request_id, data_lines = None, 0
    with httpx.stream("POST", srv.url + path, json=body, timeout=120) as r:
        assert r.status_code == 200
        for raw in r.iter_lines():
            if not raw.startswith("data: ") or raw == "data: [DONE]":
                continue
            event = json.loads(raw[len("data: ") :])
            request_id = request_id or id_of(event)
            data_lines += 1
            if request_id and data_lines > 12:  # a few tokens in: leave
                break
    assert request_id
    line = wait_for(lambda: _log_line(srv, request_id), what="the stream's log line")
    assert line["status"] == 499 and line["finish"] is None, line
    assert line["prompt_tokens"] == _prompt_tokens(srv), line
    assert 0 < line["completion_tokens"] < MAX_TOKENS, line


# -- context overflows: numbers, worded per dialect ------------------------------------------------------


def test_an_overflow_is_worded_from_its_numbers_whatever_the_message():
    over = ApiError.from_failure(FailureKind.CONTEXT_LENGTH_EXCEEDED, "(any words)", None, ContextOverflow(100, 120))
    assert over.status == 400 and over.code == "context_length_exceeded"
    assert over.body("anthropic")["error"]["message"] == "prompt is too long: 120 tokens > 100 maximum"
    assert "maximum context length is 100 tokens" in over.body()["error"]["message"]
    assert "resulted in 120 tokens" in over.body()["error"]["message"]
    both = ApiError.from_failure(FailureKind.CONTEXT_LENGTH_EXCEEDED, "", None, ContextOverflow(100, 60, 50))
    assert both.body("anthropic")["error"]["message"] == (
        "input length and `max_tokens` exceed context limit: 60 + 50 > 100, "
        "decrease input length or `max_tokens` and try again"
    )
    assert "requested 110 tokens (60 in the messages, 50 in the completion)" in both.body()["error"]["message"]
    plain = ApiError.from_failure(FailureKind.CONTEXT_LENGTH_EXCEEDED, "an embedding input is too long")
    assert plain.body("anthropic")["error"]["message"] == plain.body()["error"]["message"] == plain.message


def test_a_request_whose_tokens_all_came_with_its_finished_event_still_has_a_first_token_time():
    """Under load the leader may send a short answer's tokens with its Finished and no Delta before
    it: the log line still reports a time to the first token (then), not null."""
    from cortex.ops.reqlog import RequestRecord

    record = RequestRecord("openai", "chat", node="test")
    record.finished(prompt_tokens=7, completion_tokens=5, cached_tokens=0, reason="length")
    assert record.first_token is not None and record.first_token >= record.started
    empty = RequestRecord("openai", "chat", node="test")
    empty.finished(prompt_tokens=7, completion_tokens=0, cached_tokens=0, reason="stop")
    assert empty.first_token is None  # no token at all: no time to a first one

"""Requests generated from /openapi.json (schemathesis) against a real `cortex serve`: valid and invalid
bodies, headers and paths for every operation. None may get a 5xx (503 with Retry-After is backpressure,
not a fault) or take a process down, and every answer must be one the document declares.

Bounded for `make test`: a fixed number of examples per operation, derandomized (the same cases every
run); CORTEX_FUZZ_EXAMPLES and CORTEX_FUZZ_SEED widen or vary the run. Generated lengths are clamped to
MAX_TOKENS here, not in the document, and generation uses the served model instead of random names
(which would only ever reach the 404 path).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, assume, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from cortex.api.openapi import document

EXAMPLES = int(os.environ.get("CORTEX_FUZZ_EXAMPLES", "40"))
SEED = os.environ.get("CORTEX_FUZZ_SEED")
MAX_TOKENS = 4
MODEL = "tiny"  # tests/conftest.py: tiny_server serves "tiny", alias "small"
GENERATE = {"/v1/chat/completions", "/v1/completions", "/v1/messages"}
PROMPTED = GENERATE | {"/v1/messages/count_tokens"}
HI = [{"role": "user", "content": "Hi"}]

OPERATIONS = [(path, method) for path, item in document()["paths"].items() for method in item]


@pytest.fixture(scope="module")
def api_schema(tiny_server) -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict(
        {"base-url": tiny_server.url, "request-timeout": 60, "output": {"sanitization": {"enabled": False}}}
    )
    r = httpx.get(tiny_server.url + "/openapi.json", timeout=30)
    r.raise_for_status()
    return schemathesis.openapi.from_dict(r.json(), config=config)


def _known_bug(case: schemathesis.Case) -> bool:
    """Cases that hit a bug already reported, left out so the run goes on (none open now)."""
    return False


def _bound(case: schemathesis.Case) -> None:
    """Keep generation short and aimed at the served model; never unload it."""
    body = case.body
    if not isinstance(body, dict):
        return
    path = case.operation.path
    if path in PROMPTED and isinstance(body.get("model"), str):
        body["model"] = MODEL
    if path in GENERATE:
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if type(value) is int and value > MAX_TOKENS:
                body[key] = MAX_TOKENS
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = MAX_TOKENS
    if path == "/models/unload" and body.get("model") in (MODEL, "small"):
        body["model"] = "not-a-model"


@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m.upper()} {p}" for p, m in OPERATIONS])
def test_generated_requests(api_schema, tiny_server, path, method):
    """Schemathesis' own pytest plugin does not run under pytest 9, so its strategies drive Hypothesis here."""
    operation = api_schema[path][method]
    cases = st.one_of(operation.as_strategy(mode) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE))

    @given(case=cases)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,  # no replay of earlier failures: every run sends the same cases
        derandomize=SEED is None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],  # no shrinking: each step is a real request; the case is printed
    )
    def check(case: schemathesis.Case) -> None:
        _bound(case)
        assume(not _known_bug(case))
        response = case.call(timeout=60)
        status = response.status_code
        assert tiny_server.proc.poll() is None, f"cortex serve exited:\n{tiny_server.logs()}"
        if status >= 500:
            assert status == 503 and "retry-after" in response.headers, (
                f"{status} for {case.as_curl_command()}\n{response.content[:2000]!r}"
            )
        case.validate_response(response, checks=[status_code_conformance, response_schema_conformance])

    if SEED is not None:
        check = seed(int(SEED))(check)
    check()


def test_the_server_survived(tiny_server):
    assert tiny_server.proc.poll() is None, tiny_server.logs()
    assert tiny_server.health()["status"] == "ok"
    r = httpx.post(
        tiny_server.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        timeout=60,
    )
    assert r.status_code == 200, r.text


# -- bugs the fuzz run found, fixed; these keep them fixed -----------------------------------------------------

HUGE = 2**70


@pytest.mark.parametrize("name", [[[], {}], {"a": 1}, 7, None])
def test_a_forced_tool_named_by_something_not_a_string_is_a_400(tiny_server, name):
    tool = {"name": "get_weather", "input_schema": {"type": "object"}}
    body = {
        "model": MODEL,
        "messages": HI,
        "max_tokens": 2,
        "tools": [tool],
        "tool_choice": {"type": "tool", "name": name},
    }
    r = httpx.post(tiny_server.url + "/v1/messages", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_logit_bias_key_of_superscript_digits_is_a_400(tiny_server, path):
    body = {"model": MODEL, "messages": HI, "prompt": "Hi", "max_tokens": 2, "logit_bias": {"\u00b2": 1}}
    r = httpx.post(tiny_server.url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text


@pytest.mark.parametrize(
    "extra",
    [
        {"seed": HUGE},
        {"seed": -(2**63) - 1},
        {"top_k": HUGE},
        {"max_tokens": HUGE},
        {"stop_token_ids": [HUGE]},
        {"logit_bias": {str(HUGE): 1}},
        {"chat_template_kwargs": {"x": HUGE}},
    ],
    ids=lambda extra: next(iter(extra)),
)
def test_out_of_range_integers_are_a_400(tiny_server, extra):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra}
    r = httpx.post(tiny_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": ""}),
        ("/v1/completions", {"prompt": [""]}),
        ("/v1/chat/completions", {"messages": HI, "top_p": 0}),
        ("/v1/messages", {"messages": HI, "top_p": 0}),
    ],
    ids=["completions-empty-prompt", "completions-empty-prompt-array", "chat-top_p-0", "messages-top_p-0"],
)
def test_a_bad_request_fails_only_itself(tiny_server, path, body):
    """Found by the fuzz run: each of these failed its step with a 503 worker_failed (no Retry-After), and
    with it every other request in that step."""
    chat = {"model": MODEL, "messages": HI, "max_tokens": 64, "ignore_eos": True}
    with ThreadPoolExecutor(1) as pool:
        bystander = pool.submit(httpx.post, tiny_server.url + "/v1/chat/completions", json=chat, timeout=60)
        time.sleep(0.2)
        r = httpx.post(tiny_server.url + path, json={"model": MODEL, "max_tokens": 2, **body}, timeout=60)
        assert r.status_code in (200, 400), r.text
        assert bystander.result().status_code == 200, bystander.result().text

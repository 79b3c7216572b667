"""The daemon as clients see it: `cortex serve` subprocesses, real HTTP, the official openai SDK."""

from __future__ import annotations

import json
import os
import re
import signal
import threading

import httpx
import openai
import pytest

from cortex.api.engine_client import EngineClient
from cortex.api.errors import ApiError
from rpc.engine import Finished, Submit
from rpc.messages import SamplingParams
from tests.conftest import STOP_WAIT_S, Server, json_events, read_sse, tiny_models_toml, wait_for

HI = [{"role": "user", "content": "Hello, world!"}]


@pytest.fixture
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0)


# -- chat completions ----------------------------------------------------------------------------


def test_chat_completion_shape_and_usage(client, tiny_qwen3):
    from cortex.chat.tokenizer import from_hf_dir

    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=5, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == "tiny"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    # the prompt is the model's chat template rendered and tokenized: count it independently
    rendered = "<|im_start|>user\nHello, world!<|im_end|>\n<|im_start|>assistant\n"
    assert r.usage.prompt_tokens == len(from_hf_dir(tiny_qwen3).encode(rendered))
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_alias_and_greedy_is_deterministic(client):
    a = client.chat.completions.create(model="tiny", messages=HI, max_tokens=12, temperature=0)
    b = client.chat.completions.create(model="small", messages=HI, max_tokens=12, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_seeded_sampling_is_reproducible_and_seed_matters(client):
    def run(seed):
        return (
            client.chat.completions.create(model="tiny", messages=HI, max_tokens=16, temperature=1.0, seed=seed)
            .choices[0]
            .message.content
        )

    first = run(7)
    assert run(7) == first
    assert any(run(s) != first for s in (8, 9, 10))


def test_streamed_chunks_match_the_non_streamed_answer(client, tiny_server):
    full = client.chat.completions.create(model="tiny", messages=HI, max_tokens=10, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=HI,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert len(chunks) > 3


def test_stream_wire_format_ends_with_done(tiny_server):
    body = {"model": "tiny", "messages": HI, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", tiny_server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        lines = read_sse(r)
    assert lines[-1] == "[DONE]"
    assert all(e["object"] == "chat.completion.chunk" for e in json_events(lines))


def test_stop_string_is_not_emitted(client):
    base = client.chat.completions.create(model="tiny", messages=HI, max_tokens=24, temperature=0)
    text = base.choices[0].message.content
    assert len(text) > 4, "the tiny model should produce some text"
    stop = text[2:4]
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[: text.index(stop)]


# -- listing and health -----------------------------------------------------------------------------


def test_models_list_and_get(client):
    ids = {m.id for m in client.models.list().data}
    assert {"tiny", "small"} <= ids
    m = client.models.retrieve("tiny")
    assert m.id == "tiny" and m.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_health_reports_workers_and_models(tiny_server):
    h = httpx.get(tiny_server.url + "/health", timeout=30).json()
    assert h["status"] == "ok"
    assert h["workers"][0]["alive"] and h["workers"][0]["device"] == "cpu"
    assert h["models"][0]["status"] == "loaded"


# -- errors, in the OpenAI envelope -----------------------------------------------------------------


def _post(srv, body, **kw):
    return httpx.post(srv.url + "/v1/chat/completions", timeout=30, **({"json": body} if body is not None else kw))


def _error(r):
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    return err


def test_malformed_json_is_400(tiny_server):
    r = _post(
        tiny_server, None, content=b'{"model": "tiny", "messages": [', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert _error(r)["code"] == "invalid_json"


def test_nan_and_infinity_are_not_json(tiny_server):
    """Python's json reads them; JSON has none. A NaN would slip past every range check."""
    for word in ("NaN", "Infinity", "-Infinity"):
        body = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "frequency_penalty": '
        r = _post(tiny_server, None, content=body + word.encode() + b"}", headers={"content-type": "application/json"})
        assert r.status_code == 400
        assert _error(r)["code"] == "invalid_json" and word in _error(r)["message"]
    r = httpx.post(
        tiny_server.url + "/v1/messages",
        content=b'{"model": "tiny", "max_tokens": 2, "temperature": NaN, "messages": [{"role": "user", "content": "x"}]}',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert (
        _post(
            tiny_server, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        ).status_code
        == 200
    )


def test_a_request_whose_sampling_fails_fails_alone(tiny_server):
    """The worker cannot draw from a request's distribution (a NaN bias: the API refuses NaN, so
    only a direct engine client can send one). That request, both its choices, gets a 500; a
    request sharing its steps completes, and every KV block comes back."""
    client = EngineClient(f"ipc://{tiny_server.root / 'run'}/engine.sock", event_timeout_s=60)
    try:
        ask = [{"role": "user", "content": "hi"}]
        good = client.submit(
            Submit("good", "tiny", ask, SamplingParams(temperature=0.0), max_tokens=60, ignore_eos=True)
        )
        poisoned = SamplingParams(temperature=1.0, logit_bias={5: float("nan")})
        bad = client.submit(Submit("bad", "tiny", ask, poisoned, max_tokens=8, n=2))
        with pytest.raises(ApiError) as failed:
            list(bad.events())
        assert failed.value.status == 500 and "sampling failed" in failed.value.message
        done = [ev for ev in good.events() if isinstance(ev, Finished)]
        assert len(done) == 1 and done[0].completion_tokens == 60
    finally:
        client.close()
    engine = tiny_server.health()["models"][0]["engine"]
    assert engine["kv_blocks_used"] == 0 and engine["running"] == 0


def test_body_must_be_an_object(tiny_server):
    r = _post(tiny_server, None, content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": HI}, "model"),
        ({"model": "tiny"}, "messages"),
        ({"model": 5, "messages": HI}, "model"),
        ({"model": "tiny", "messages": "hi"}, "messages"),
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "tiny", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"model": "tiny", "messages": HI, "temperature": "hot"}, "temperature"),
        ({"model": "tiny", "messages": HI, "temperature": 9}, "temperature"),
        ({"model": "tiny", "messages": HI, "max_tokens": 0}, "max_tokens"),
        ({"model": "tiny", "messages": HI, "stream": "yes"}, "stream"),
        ({"model": "tiny", "messages": HI, "stop": [1]}, "stop"),
    ],
)
def test_bad_fields_are_400_naming_the_field(tiny_server, body, param):
    r = _post(tiny_server, body)
    assert r.status_code == 400, r.text
    assert _error(r)["param"] == param


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=HI)
    assert e.value.body["code"] == "model_not_found"


def test_oversized_body_is_413(tiny_server):
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}
    r = _post(tiny_server, big)
    assert r.status_code == 413
    assert _error(r)["code"] == "request_too_large"


def test_prompt_over_the_context_is_400(client):
    long = [{"role": "user", "content": "Hello world " * 300}]  # max_context = 256 in this server's catalogue
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=long)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=1000)


def test_unknown_route_and_method_use_the_envelope(tiny_server):
    r = httpx.get(tiny_server.url + "/v1/nothing-here", timeout=30)
    assert r.status_code == 404 and _error(r)
    r = httpx.delete(tiny_server.url + "/v1/chat/completions")
    assert r.status_code == 405 and _error(r)


def test_server_keeps_serving_after_bad_input(client):
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3


def test_concurrent_requests_all_complete(client):
    results, errors = [], []

    def go():
        try:
            r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=8, temperature=0)
            results.append(r.choices[0].message.content)
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 6 and len(set(results)) == 1


# -- loading, crashes, shutdown --------------------------------------------------------------------


def test_requests_wait_for_a_loading_model_and_streams_get_keepalives(tmp_path, tiny_qwen3):
    """A cold model is not an error: the request waits for the load, a stream is kept alive with
    SSE comments meanwhile, and only past the waiting room's bound is it a 503 with Retry-After."""
    gate = tmp_path / "hold-loads"  # the preload waits while it exists
    gate.touch()
    srv = Server(
        tmp_path,
        tiny_models_toml(tiny_qwen3),
        "keepalive_s = 1\n[engine]\nmax_waiting = 1\n",
        env={"CORTEX_TEST_LOAD_GATE_FILE": str(gate)},
    )
    try:
        srv.wait_http()
        h = httpx.get(srv.url + "/health", timeout=30)
        assert h.status_code == 503 and h.json()["status"] == "loading"
        # ignore_eos: a random tiny model may sample its end token, and this test is about "length"
        body = {"model": "tiny", "messages": HI, "max_tokens": 2, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk goes out at once
            over = _post(srv, {"model": "tiny", "messages": HI, "max_tokens": 2})
            assert over.status_code == 503 and int(over.headers["retry-after"]) > 0, over.text
            assert _error(over)["code"] == "model_loading"
            assert next(ln for ln in lines if ln) == ": keep-alive"  # while the load goes on
            gate.unlink()
            rest = [ln for ln in lines if ln]
        assert rest[-1] == "data: [DONE]", rest
        assert json.loads(rest[-2][len("data: ") :])["choices"][0]["finish_reason"] == "length"
        assert _post(srv, {"model": "tiny", "messages": HI, "max_tokens": 2}).status_code == 200
    finally:
        srv.stop()


@pytest.mark.slow
def test_worker_crash_fails_the_request_then_recovers(tmp_path, tiny_qwen3):
    # 20 ms per step: the 1,500 tokens would take 30 s or more; the stream ends with the worker
    srv = Server(tmp_path, tiny_models_toml(tiny_qwen3), env={"CORTEX_TEST_STEP_DELAY_S": "0.02"})
    try:
        pid = srv.wait_healthy()["workers"][0]["pid"]
        body = {"model": "tiny", "messages": HI, "max_tokens": 1500, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as r:
            events = []
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
                if len(events) == 3:
                    os.kill(pid, signal.SIGKILL)
        assert len([e for e in events if "choices" in e]) < 100  # cut off by the crash, not run to its end
        assert "error" in events[-1], events[-1]
        assert events[-1]["error"]["code"] == "worker_failed"

        h = srv.health()
        assert h["workers"][0]["restarts"] == 1
        assert h["workers"][0]["last_exit"] == "killed by SIGKILL"
        assert h["status"] in ("degraded", "loading", "ok")

        h = srv.wait_healthy()
        assert h["workers"][0]["pid"] != pid and h["models"][0]["status"] == "loaded"
        assert _post(srv, {"model": "tiny", "messages": HI, "max_tokens": 2}).status_code == 200
        # the replacement was the spare started in advance ([node] spare_workers), and a new spare
        # waits for the next death
        log = srv.logs(tail=0)
        spares = [int(m) for m in re.findall(r"worker 0 \(cpu\): spare started, pid (\d+)", log)]
        assert h["workers"][0]["pid"] == spares[0], log[-2000:]
        assert f"worker 0 (cpu) woken from its spare, pid {spares[0]}" in log
        wait_for(lambda: len(re.findall("spare started", srv.logs(tail=0))) == 2, what="a new spare")
    finally:
        srv.stop()


@pytest.mark.slow
def test_without_spare_workers_a_dead_worker_is_started_afresh(tmp_path, tiny_qwen3):
    srv = Server(tmp_path, tiny_models_toml(tiny_qwen3), node_extra="memory_budget_mb = 16384\nspare_workers = false\n")
    try:
        pid = srv.wait_healthy()["workers"][0]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: srv.health()["workers"][0]["pid"] not in (None, pid), what="a new worker")
        srv.wait_healthy()
        log = srv.logs(tail=0)
        assert "spare started" not in log and "from its spare" not in log
        assert log.count("worker 0 (cpu) started, pid") == 2
    finally:
        srv.stop()


def test_sigterm_stops_everything_in_order(tmp_path, tiny_qwen3):
    """Every process exits on its own (systemd's stop timeout is never reached on a quiet box:
    about 4 s here); nothing is killed."""
    srv = Server(tmp_path, tiny_models_toml(tiny_qwen3))
    srv.wait_healthy()
    children = srv.children()
    assert len(children) >= 2  # a worker and the gunicorn front
    srv.stop()
    assert srv.proc.returncode == 0  # not the SIGKILL that stop() sends after STOP_WAIT_S
    assert "SIGKILL" not in srv.logs(tail=0)
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_ignore_eos_generates_exactly_max_tokens(client):
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=40, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"


def test_ctrl_c_to_the_process_group_stops_everything_in_order(tmp_path, tiny_qwen3):
    """What a terminal does on Ctrl-C: SIGINT to every process of the foreground group."""
    srv = Server(tmp_path, tiny_models_toml(tiny_qwen3), start_new_session=True)
    srv.wait_healthy()
    children = srv.children()
    os.killpg(srv.proc.pid, signal.SIGINT)
    srv.proc.wait(STOP_WAIT_S)
    assert srv.proc.returncode == 0
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "SIGKILL" not in srv.logs(tail=0)  # nothing had to be killed


def test_the_front_and_workers_never_outlive_a_killed_leader(tmp_path, tiny_qwen3):
    srv = Server(tmp_path, tiny_models_toml(tiny_qwen3))
    srv.wait_healthy()
    children = srv.children()
    srv.proc.kill()  # no chance to clean up
    srv.proc.wait()
    wait_for(lambda: not any(_alive(p) for p in children), what="the children to follow the leader")
    srv.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"  # a zombie is dead, only not yet reaped

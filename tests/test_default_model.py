"""`cortex serve` with no config: the embedded defaults serve SmolLM2-135M-Instruct, a real model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.conftest import free_port, read_sse

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    run = tmp_path_factory.mktemp("xdg")
    port = free_port()
    log = open(run / "serve.log", "wb")  # noqa: SIM115 (closed below)
    # XDG_RUNTIME_DIR only moves the sockets out of the way of a cortex the developer may be running
    proc = subprocess.Popen(
        [sys.executable, "-m", "cortex.cli", "serve", "--listen", f"127.0.0.1:{port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "XDG_RUNTIME_DIR": str(run)},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, (run / "serve.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise TimeoutError((run / "serve.log").read_text())
        yield url, run / "serve.log"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        log.close()


def test_answers_paris(default_server):
    url, _ = default_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    r = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0


def test_streams_paris_in_several_chunks_ending_with_done(default_server):
    url, _ = default_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    chunks = list(client.chat.completions.create(model="default", messages=QUESTION, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    # the first token alone, then up to [engine] decode_steps (4) tokens an event
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 3
    body = {"model": "default", "messages": QUESTION, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert read_sse(r)[-1] == "[DONE]"


def test_logs_what_it_listens_on_and_load_progress(default_server):
    url, log = default_server
    text = log.read_text()
    assert f"serving the OpenAI API on http://{url.removeprefix('http://')}/v1" in text
    assert "loading smollm2-135m-instruct: 50%" in text
    assert "model smollm2-135m-instruct loaded" in text

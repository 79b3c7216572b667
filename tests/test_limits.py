"""Per-key limits (cortex/leader/limits.py): concurrency per key, tokens per minute, Retry-After."""

from __future__ import annotations

from pathlib import Path

from cortex.api.auth import key_id
from cortex.config import KeyLimit, load
from cortex.leader.limits import ClientLimits


def _limits(tmp_path: Path, keys: str, engine: str = "") -> ClientLimits:
    (tmp_path / "keys").write_text(keys)
    (tmp_path / "models.toml").write_text("")
    (tmp_path / "cortex.toml").write_text(f'[gateway]\napi_key_file = "keys"\n[engine]\n{engine}\n')
    return ClientLimits(load(tmp_path / "cortex.toml"))


def test_a_keys_own_concurrency_overrides_the_default(tmp_path):
    limits = _limits(tmp_path, "sk-small max_concurrent=2\nsk-plain\n", "max_requests_per_client = 5")
    small, plain = key_id("sk-small"), key_id("sk-plain")
    assert limits.refusal(small, 1) is None
    message, retry = limits.refusal(small, 2)
    assert "2 requests in flight" in message and retry == 1
    assert limits.refusal(plain, 4) is None and limits.refusal(plain, 5) is not None
    assert limits.refusal("addr:10.0.0.1", 4) is None  # an address gets the default too


def test_tokens_per_minute_refuse_until_the_window_has_room(tmp_path):
    limits = _limits(tmp_path, "sk-meter tokens_per_minute=1000\n")
    meter = key_id("sk-meter")
    limits.charge(meter, 400, now=100.0)
    limits.charge(meter, 700, now=130.0)
    message, retry = limits.refusal(meter, 0, now=140.0)
    assert "1100 of its 1000 tokens per minute" in message
    assert retry == 20  # the 400 tokens of t=100 leave the window at t=160
    assert limits.refusal(meter, 0, now=160.5) is None  # 700 left in the window
    assert limits.refusal(key_id("sk-other"), 0, now=140.0) is None  # other keys are not metered


def test_a_reload_keeps_the_meters_of_keys_still_limited(tmp_path):
    limits = _limits(tmp_path, "sk-meter tokens_per_minute=10\nsk-gone tokens_per_minute=10\n")
    limits.charge(key_id("sk-meter"), 50)
    limits.charge(key_id("sk-gone"), 50)
    (tmp_path / "keys").write_text("sk-meter tokens_per_minute=10\n")
    limits.configure(load(tmp_path / "cortex.toml"))
    assert set(limits.meters) == {key_id("sk-meter")}
    assert limits.refusal(key_id("sk-meter"), 0) is not None
    assert limits.by_client == {key_id("sk-meter"): KeyLimit(tokens_per_minute=10)}


def test_over_its_limits_a_key_gets_429_in_its_dialect_and_other_keys_still_serve(tmp_path, tiny_qwen3):
    """A real server: `sk-one` may have one request in flight, `sk-meter` 30 tokens a minute;
    `sk-free` is not limited. The same key counts once whichever header carries it."""
    import httpx

    from tests.conftest import Server, tiny_models_toml

    (tmp_path / "keys").write_text("sk-one max_concurrent=1\nsk-meter tokens_per_minute=30\nsk-free\n")
    srv = Server(
        tmp_path,
        tiny_models_toml(tiny_qwen3),
        'api_key_file = "keys"\n',
        env={"CORTEX_TEST_STEP_DELAY_S": "0.05"},  # a 200-token stream stays in flight for 10 s
    )
    try:
        srv.wait_healthy()
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        long = {**chat, "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.stream(
            "POST", srv.url + "/v1/chat/completions", json=long, headers={"Authorization": "Bearer sk-one"}, timeout=60
        ) as running:
            next(running.iter_lines())  # it has started
            second = httpx.post(
                srv.url + "/v1/chat/completions", json=chat, headers={"Authorization": "Bearer sk-one"}, timeout=60
            )
            assert second.status_code == 429 and second.headers["retry-after"] == "1", second.text
            assert second.json()["error"]["type"] == "rate_limit_error"
            anthropic_way = httpx.post(
                srv.url + "/v1/messages",
                json=chat,
                headers={"x-api-key": "sk-one", "anthropic-version": "2023-06-01"},
                timeout=60,
            )
            assert anthropic_way.status_code == 429  # the same key in the other header is the same client
            assert anthropic_way.json()["error"]["type"] == "rate_limit_error"
            other = httpx.post(
                srv.url + "/v1/chat/completions", json=chat, headers={"Authorization": "Bearer sk-free"}, timeout=60
            )
            assert other.status_code == 200  # one key's limit does not hold up another
        metered = {"Authorization": "Bearer sk-meter"}
        first = httpx.post(
            srv.url + "/v1/chat/completions", json={**chat, "max_tokens": 40}, headers=metered, timeout=60
        )
        assert first.status_code == 200 and first.json()["usage"]["total_tokens"] >= 30
        over = httpx.post(srv.url + "/v1/chat/completions", json=chat, headers=metered, timeout=60)
        assert over.status_code == 429 and "tokens per minute" in over.json()["error"]["message"]
        assert 1 <= int(over.headers["retry-after"]) <= 60
    finally:
        srv.stop()

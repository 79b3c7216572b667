"""Model lifecycle: load on demand, memory accounting, eviction by policy, pins, defragmentation.

Every test runs a real `cortex serve` whose device budget is set so that a known number of tiny
models fit (each takes ~1.5 MiB: ~0.5 MiB of weights and a 1 MiB KV pool). The same checkpoint
serves under several ids, so each id is a separate model to the leader.
"""

from __future__ import annotations

import threading

import anthropic
import httpx
import openai
import pytest

from tests.conftest import Server, wait_for

HI = [{"role": "user", "content": "Hi"}]
ADMIN = "sk-admin-test"
KEY = "sk-api-test"


def catalogue(model_dir, ids: list[str], **per_model: str) -> str:
    """models.toml: one entry per id over the same checkpoint; ``per_model[id]`` adds keys."""
    out = ""
    for i in ids:
        out += f'[[models]]\nid = "{i}"\npath = "{model_dir}"\n{per_model.get(i, "")}\n'
    return out


@pytest.fixture
def start(tmp_path):
    """Start servers whose config is written before the process reads it."""
    servers = []

    def go(models: str, budget_mb: int, strategy="lru", gateway="", env=None, defrag=0) -> Server:
        root = tmp_path / f"s{len(servers)}"
        root.mkdir()
        extra = (
            f'{gateway}[engine]\nkv_cache_mb = 1\n[eviction]\nstrategy = "{strategy}"\ndefrag_after_cycles = {defrag}\n'
        )
        budget = f"memory_budget_mb = {budget_mb}\nmemory_headroom_mb = 0\n"
        srv = Server(root, models, extra, env=env, node_extra=budget)
        servers.append(srv)
        srv.wait_healthy()
        return srv

    yield go
    for s in servers:
        s.stop()


def chat(srv: Server, model: str, **kw) -> httpx.Response:
    body = {"model": model, "messages": HI, "max_tokens": 4, **kw}
    return httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120)


def table(srv: Server, key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = httpx.get(srv.url + "/models", headers=headers, timeout=30).json()
    return data


def models(srv: Server) -> dict[str, dict]:
    return {m["id"]: m for m in table(srv)["models"]}


def evictions(srv: Server) -> dict[str, int]:
    return srv.health()["eviction"]["evictions"]


# -- eviction ---------------------------------------------------------------------------------------


def test_a_request_for_b_evicts_a_and_serves_b(start, tiny_qwen3):
    srv = start(catalogue(tiny_qwen3, ["a", "b"]), budget_mb=2)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    client.chat.completions.create(model="a", messages=HI, max_tokens=4)
    assert models(srv)["a"]["status"] == "loaded"
    out = client.chat.completions.create(model="b", messages=HI, max_tokens=4)
    assert out.choices[0].message.content is not None
    m = models(srv)
    assert (m["a"]["status"], m["b"]["status"]) == ("unloaded", "loaded")
    assert m["a"]["evictions"] == 1 and evictions(srv) == {"lru": 1}
    assert "evicting a" in srv.logs(tail=0) and "to make room for b" in srv.logs(tail=0)
    device = srv.health()["devices"][0]
    assert device["budget_bytes"] == 2 * 2**20
    assert device["used_bytes"] == m["b"]["size_bytes"] > 2**20  # weights + the 1 MiB KV pool
    assert device["free_bytes"] == device["budget_bytes"] - device["used_bytes"]


def test_an_lru_trace_loads_exactly_what_lru_predicts(start, tiny_qwen3):
    # room for two: A B A A C must load A, B, C once each and evict B (A was used after B)
    srv = start(catalogue(tiny_qwen3, ["a", "b", "c"]), budget_mb=4)
    for model in ["a", "b", "a", "a", "c"]:
        assert chat(srv, model).status_code == 200
    m = models(srv)
    assert {k: v["loads"] for k, v in m.items()} == {"a": 1, "b": 1, "c": 1}
    assert {k: v["status"] for k, v in m.items()} == {"a": "loaded", "b": "unloaded", "c": "loaded"}
    assert evictions(srv) == {"lru": 1} and m["b"]["evictions"] == 1
    # and back to B: A (last used before C) is now the least recently used
    assert chat(srv, "b").status_code == 200
    m = models(srv)
    assert (m["a"]["status"], m["c"]["status"]) == ("unloaded", "loaded")
    assert srv.health()["eviction"]["loads"] == 4


def test_priority_keeps_a_more_important_resident_with_a_clear_503(start, tiny_qwen3):
    models_toml = catalogue(
        tiny_qwen3,
        ["important", "minor", "peer"],
        important="residency_priority = 200",
        minor="residency_priority = 50",
    )
    srv = start(models_toml, budget_mb=2, strategy="priority")
    assert chat(srv, "important").status_code == 200
    r = chat(srv, "minor")
    assert r.status_code == 503 and r.headers["retry-after"]
    err = r.json()["error"]
    assert err["code"] == "insufficient_memory"
    assert "important: residency_priority 200 > 50" in err["message"], err["message"]
    assert models(srv)["important"]["status"] == "loaded"
    # a default-priority model (100) does not displace it either
    assert chat(srv, "peer").status_code == 503
    # Anthropic clients get the same refusal in their own envelope
    ac = anthropic.Anthropic(base_url=srv.url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as info:
        ac.messages.create(model="minor", max_tokens=4, messages=HI)
    assert info.value.status_code == 503 and info.value.body["error"]["type"] == "overloaded_error"
    assert evictions(srv) == {}


def test_priority_evicts_the_lowest_priority_first_then_lru(start, tiny_qwen3):
    models_toml = catalogue(
        tiny_qwen3,
        ["low", "mid", "new"],
        low="residency_priority = 10",
        mid="residency_priority = 100",
        new="residency_priority = 100",
    )
    srv = start(models_toml, budget_mb=4, strategy="priority")
    assert chat(srv, "mid").status_code == 200
    assert chat(srv, "low").status_code == 200  # low is the most recently used, but the least important
    assert chat(srv, "new").status_code == 200
    m = models(srv)
    assert (m["low"]["status"], m["mid"]["status"], m["new"]["status"]) == ("unloaded", "loaded", "loaded")
    assert evictions(srv) == {"priority": 1}


def test_a_pinned_model_is_never_evicted(start, tiny_qwen3):
    srv = start(catalogue(tiny_qwen3, ["pinned", "other"], pinned="pinned = true\npreload = true"), budget_mb=2)
    assert models(srv)["pinned"]["status"] == "loaded" and models(srv)["pinned"]["pinned"] is True
    r = chat(srv, "other")
    assert r.status_code == 503 and "pinned: pinned" in r.json()["error"]["message"]
    assert models(srv)["pinned"]["status"] == "loaded"
    assert chat(srv, "pinned").status_code == 200


@pytest.mark.slow
def test_a_model_streaming_a_long_answer_is_not_evicted_under_it(start, tiny_qwen3):
    srv = start(
        catalogue(tiny_qwen3, ["a", "b"], a="preload = true"), budget_mb=2, env={"CORTEX_TEST_STEP_DELAY_S": "0.02"}
    )
    # 400 steps of 20 ms or more: the request for b arrives while a streams, however busy the machine
    body = {"model": "a", "messages": HI, "max_tokens": 400, "ignore_eos": True, "stream": True}
    chunks = []
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=120) as stream:
        lines = stream.iter_lines()
        for line in lines:
            if line.startswith("data: {") and '"content"' in line:
                break
        r = chat(srv, "b")  # while a streams
        assert r.status_code == 503 and r.json()["error"]["code"] == "insufficient_memory"
        assert "a: 1 request(s) in flight or queued" in r.json()["error"]["message"]
        chunks = [line for line in lines if line.startswith("data: ")]
    assert chunks[-1] == "data: [DONE]" and '"finish_reason":"length"' in "".join(chunks).replace(" ", "")
    assert chat(srv, "b").status_code == 200  # a is idle now: evicted for b
    assert models(srv)["a"]["status"] == "unloaded"


def test_ten_concurrent_first_requests_share_one_load(start, tiny_qwen3):
    srv = start(catalogue(tiny_qwen3, ["cold"]), budget_mb=8, env={"CORTEX_TEST_LOAD_DELAY_S": "1.5"})
    statuses = []

    def go():
        statuses.append(chat(srv, "cold").status_code)

    threads = [threading.Thread(target=go) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert statuses == [200] * 10
    assert models(srv)["cold"]["loads"] == 1 and srv.health()["eviction"]["loads"] == 1
    assert srv.logs(tail=0).count("loading model cold on") == 1  # the whole log: ten requests' lines follow it


def test_a_load_nobody_waits_for_any_more_is_cancelled(start, tiny_qwen3, tmp_path):
    gate = tmp_path / "hold-loads"  # every load waits while it exists
    gate.touch()
    srv = start(
        catalogue(tiny_qwen3, ["cold"]),
        budget_mb=8,
        gateway="keepalive_s = 0.3\n",
        env={"CORTEX_TEST_LOAD_GATE_FILE": str(gate)},
    )
    body = {"model": "cold", "messages": HI, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as stream:
        assert stream.status_code == 200
        next(stream.iter_raw())  # the stream is open and waiting for the load
        assert models(srv)["cold"]["status"] == "loading"
    wait_for(lambda: srv.health()["eviction"]["loads_cancelled"] == 1, what="the load to be cancelled")
    assert models(srv)["cold"]["status"] == "unloaded"
    gate.unlink()  # the worker finishes the abandoned load, then unloads it: nothing stays resident
    wait_for(lambda: "unloaded cold" in srv.logs(), what="the worker to unload the abandoned load")
    assert models(srv)["cold"]["status"] == "unloaded" and srv.health()["devices"][0]["used_bytes"] == 0
    assert chat(srv, "cold").status_code == 200  # and a later request loads it normally


def test_a_model_larger_than_the_device_is_507_naming_sizes(start, tiny_qwen3):
    srv = start(catalogue(tiny_qwen3, ["big"]), budget_mb=1)
    r = httpx.post(srv.url + "/models/load", json={"model": "big"}, timeout=60)
    assert r.status_code == 507, r.text
    message = r.json()["error"]["message"]
    assert "needs 1.5 MiB per device" in message and "whole budget is 1.0 MiB" in message, message
    r = chat(srv, "big")
    assert r.status_code == 507 and "retry-after" not in r.headers
    assert models(srv)["big"]["status"] == "unloaded"


# -- defragmentation --------------------------------------------------------------------------------


def test_after_n_cycles_the_worker_restarts_and_pinned_models_come_back(start, tiny_qwen3):
    models_toml = catalogue(tiny_qwen3, ["keep", "spare"], keep="pinned = true\npreload = true")
    srv = start(models_toml, budget_mb=8, defrag=2)
    pid = srv.health()["workers"][0]["pid"]
    for _ in range(2):  # two load/unload cycles of `spare`
        assert httpx.post(srv.url + "/models/load", json={"model": "spare"}, timeout=60).status_code == 200
        assert httpx.post(srv.url + "/models/unload", json={"model": "spare"}, timeout=60).status_code == 200
    wait_for(
        lambda: (
            (h := srv.health())["eviction"]["defrag_restarts"] == 1
            and h["workers"][0]["pid"] != pid
            and h["status"] == "ok"
        ),
        what="the worker's restart for defragmentation",
    )
    h = srv.health()
    assert h["eviction"]["defrag_restarts"] == 1
    assert h["workers"][0]["pid"] != pid and h["workers"][0]["restarts"] == 0
    assert h["devices"][0]["load_unload_cycles"] == 0
    assert models(srv)["keep"]["status"] == "loaded" and models(srv)["keep"]["loads"] == 2
    assert chat(srv, "keep").status_code == 200 and chat(srv, "spare").status_code == 200


# -- the management API ---------------------------------------------------------------------------


def test_the_management_api_takes_an_admin_key_once_keys_are_set(start, tiny_qwen3):
    srv = start(catalogue(tiny_qwen3, ["a"]), budget_mb=8, gateway=f'api_keys = ["{KEY}"]\nadmin_keys = ["{ADMIN}"]\n')
    load = srv.url + "/models/load"
    assert httpx.post(load, json={"model": "a"}).status_code == 401
    r = httpx.post(load, json={"model": "a"}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_key_required"
    r = httpx.post(load, json={"model": "a"}, headers={"x-api-key": ADMIN}, timeout=60)
    assert r.status_code == 200 and r.json()["model"]["status"] == "loaded"
    assert httpx.get(srv.url + "/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 403
    m = {x["id"]: x for x in table(srv, ADMIN)["models"]}["a"]
    assert m["size_bytes"] > 0 and m["in_flight"] == 0 and m["queued"] == 0
    # inference takes the API key; the admin key works there too
    assert chat_with(srv, KEY).status_code == 200 and chat_with(srv, ADMIN).status_code == 200

    # pin, unpin and evict at run time
    def op(name: str) -> httpx.Response:
        return httpx.post(f"{srv.url}/models/{name}", json={"model": "a"}, headers={"x-api-key": ADMIN}, timeout=60)

    assert op("pin").json()["model"]["pinned"] is True
    r = op("evict")
    assert r.status_code == 409 and "cannot be evicted: pinned" in r.json()["error"]["message"]
    assert op("unpin").json()["model"]["pinned"] is False
    assert op("evict").json()["model"]["status"] == "unloaded"
    assert srv.health()["eviction"]["evictions"] == {"admin": 1}
    assert op("evict").status_code == 409  # not loaded any more


def chat_with(srv: Server, key: str) -> httpx.Response:
    body = {"model": "a", "messages": HI, "max_tokens": 2}
    return httpx.post(
        srv.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )


# -- the accounting itself ------------------------------------------------------------------------


def test_the_weight_estimate_matches_what_a_load_measures(start, tiny_qwen3):
    from cortex.models.memory import weight_bytes
    from workers.arch.config import ModelConfig

    srv = start(catalogue(tiny_qwen3, ["a"], a="preload = true"), budget_mb=8)
    measured = models(srv)["a"]["param_bytes"]
    estimate = weight_bytes(ModelConfig.from_hf_dir(tiny_qwen3), 1, "float32")
    assert abs(estimate - measured) <= 0.02 * measured, (estimate, measured)


def test_victims_are_chosen_together_and_only_where_they_help():
    from cortex.models.memory import Resident, make_room

    mib = 2**20
    residents = [
        Resident("old-on-1", (1,), 4 * mib, None, 100, last_used=1.0),
        Resident("old", (0,), 2 * mib, None, 100, last_used=2.0),
        Resident("busy", (0,), 2 * mib, "1 request(s) in flight or queued", 100, last_used=0.5),
        Resident("newer", (0,), 2 * mib, None, 100, last_used=3.0),
        Resident("newest", (0,), 2 * mib, None, 100, last_used=4.0),
    ]
    room = make_room(5 * mib, [0], {0: 1 * mib}, {0: 9 * mib}, residents, "lru", 100)
    assert [v.id for v in room.victims] == ["old", "newer"]  # two together; rank 1's model does not help
    room = make_room(9 * mib, [0], {0: 1 * mib}, {0: 9 * mib}, residents, "lru", 100)
    assert room.refusal and "busy: 1 request(s) in flight" in room.refusal and not room.never_fits
    room = make_room(10 * mib, [0], {0: 1 * mib}, {0: 9 * mib}, residents, "lru", 100)
    assert room.never_fits
    # priority: nothing above the newcomer's priority goes, lowest first
    ranked = [
        Resident("high", (0,), 2 * mib, None, 300, last_used=0.0),
        Resident("low-recent", (0,), 2 * mib, None, 10, last_used=9.0),
        Resident("mid-old", (0,), 2 * mib, None, 50, last_used=1.0),
    ]
    room = make_room(4 * mib, [0], {0: 0}, {0: 6 * mib}, ranked, "priority", 100)
    assert [v.id for v in room.victims] == ["low-recent", "mid-old"]
    room = make_room(6 * mib, [0], {0: 0}, {0: 6 * mib}, ranked, "priority", 100)
    assert "high: residency_priority 300 > 100" in room.refusal


# -- the catalogue ---------------------------------------------------------------------------------


def fake_hf_cache(root, model_dir, repo: str = "org/tiny"):
    """A Hugging Face hub cache holding ``model_dir`` as the snapshot of ``repo`` (no network)."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, base / "snapshots" / commit)
    return root


def test_catalogue_sources_aliases_limits_and_statuses(start, tiny_qwen3, tmp_path):
    cache = fake_hf_cache(tmp_path / "hub", tiny_qwen3)
    models_toml = catalogue(
        tiny_qwen3, ["local"], local='aliases = ["alpha", "first"]\nmax_output_tokens = 8\npreload = true'
    )
    models_toml += '[[models]]\nid = "from-hub"\nsource = "hf:org/tiny"\n'
    models_toml += '[[models]]\nid = "not-cached"\nsource = "hf:org/missing"\n'
    srv = start(models_toml, budget_mb=8, env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)

    # the hub model loads offline from the cache; the missing one fails with a clear reason
    assert client.chat.completions.create(model="from-hub", messages=HI, max_tokens=2).choices
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="not-cached", messages=HI, max_tokens=2)
    assert info.value.status_code == 500  # final until an operator acts: retrying cannot help
    assert info.value.response.headers["x-should-retry"] == "false"
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in info.value.message

    # aliases from the model's own list answer as the model; its output limit is enforced
    assert client.chat.completions.create(model="alpha", messages=HI, max_tokens=2).model in ("alpha", "local")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="first", messages=HI, max_tokens=9)
    assert "at most 8 tokens" in info.value.message
    out = client.chat.completions.create(model="local", messages=HI, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 8  # no max_tokens: the model's limit applies

    # /v1/models: every catalogue model and alias, with its status and where it is resident
    listed = {m.id: m.model_dump() for m in client.models.list()}
    assert {"local", "from-hub", "not-cached", "alpha", "first"} <= set(listed)
    assert listed["local"]["status"] == "loaded" and listed["local"]["devices"] == ["cpu"]
    assert listed["not-cached"]["status"] == "failed" and listed["not-cached"]["devices"] == []
    assert listed["alpha"]["alias_for"] == "local"


# -- a broken model -----------------------------------------------------------------------------------


def test_a_broken_model_file_is_a_final_error_naming_it_and_the_node_keeps_serving(start, tiny_qwen3, tmp_path):
    """One catalogue model whose weights file is cut short: its requests get a 500 that names the
    file and the reason and tells clients not to retry (no Retry-After, ``x-should-retry: false``),
    in each dialect; the node is degraded, not down (/health 200), and its other model serves."""
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_qwen3, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    srv = start(catalogue(tiny_qwen3, ["good"]) + catalogue(broken, ["broken"]), budget_mb=64)

    r = chat(srv, "broken")
    assert r.status_code == 500, r.text
    assert r.headers.get("x-should-retry") == "false" and "retry-after" not in r.headers
    err = r.json()["error"]
    assert err["code"] == "model_load_failed"
    assert "model.safetensors" in err["message"], err["message"]
    again = httpx.post(
        srv.url + "/v1/messages",
        json={"model": "broken", "max_tokens": 4, "messages": HI},
        headers={"anthropic-version": "2023-06-01"},
        timeout=60,
    )
    assert again.status_code == 500 and again.json()["error"]["type"] == "api_error", again.text
    assert "model.safetensors" in again.json()["error"]["message"]
    assert again.headers.get("x-should-retry") == "false"

    health = httpx.get(srv.url + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    assert {m["id"]: m["status"] for m in health.json()["models"]} == {"good": "unloaded", "broken": "failed"}
    assert chat(srv, "good").status_code == 200
    assert httpx.get(srv.url + "/health/live", timeout=30).status_code == 200

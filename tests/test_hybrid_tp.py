"""Tensor parallelism for the hybrid models (Qwen3.5, dense Qwen3-Next): one model across two worker
processes joined by a gloo group, loaded with ``LoadDenseShard`` and stepped with ``GenerateStep`` as
the leader drives them, computes what one process computes; and a served model with
tensor_parallel = 2 answers what tensor_parallel = 1 answers.

Each rank holds its key-head groups of every DeltaNet layer (their q, k, v, z, b, a rows, conv
channels, decays) and their conv and delta states, and its heads of full attention; the row-parallel
``out_proj`` / ``o_proj`` / ``down_proj`` all-reduce (workers/arch/qwen3_5.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tests.checkpoints import make_hybrid_checkpoint, write_chatml_tokenizer_config
from tests.conftest import Server, train_tiny_tokenizer
from tests.tp_harness import rel_err, run_tp_steps, with_sampled_tokens
from workers.arch.config import ModelConfig

SAME = 1e-5  # relative: the all-reduce only changes the order of the output projections' sums
A = [3, 17, 42, 99, 7, 250, 11, 5, 300, 18, 64]  # 11 tokens: prefilled as 7 + 4
B = [8, 400, 23, 61, 5, 90, 311, 2, 77, 140, 9, 33, 480, 12, 6, 201, 45, 19, 70]  # 19: 7 + 5 + 7
SLOT_A, SLOT_B, SLOTS = 2, 0, 3  # out of order, and slot 1 unused, on purpose
DECODES = 8


def _plan() -> list[list[tuple]]:
    """Both sequences in every step, each in its own state slot: uneven prompt chunks (the states
    carry from chunk to chunk), a step where A decodes while B prefills its last chunk, then greedy
    decoding (None: the token sampled for that sequence on its previous step)."""
    plan = [
        [(0, A[:7], 0, SLOT_A, False), (1, B[:7], 0, SLOT_B, False)],
        [(0, A[7:], 7, SLOT_A, True), (1, B[7:12], 7, SLOT_B, False)],
        [(0, None, len(A), SLOT_A, True), (1, B[12:], 12, SLOT_B, True)],
    ]
    for i in range(1, DECODES):
        plan.append([(0, None, len(A) + i, SLOT_A, True), (1, None, len(B) + i - 1, SLOT_B, True)])
    plan.append([(1, None, len(B) + DECODES - 1, SLOT_B, True)])
    return plan


@pytest.fixture(scope="module")
def qwen3_5_vlm(tmp_path_factory) -> Path:
    return make_hybrid_checkpoint(tmp_path_factory.mktemp("h-qwen3_5"), vlm=True)


@pytest.fixture(scope="module")
def qwen3_next(tmp_path_factory) -> Path:
    return make_hybrid_checkpoint(tmp_path_factory.mktemp("h-qwen3_next"), arch="qwen3_next")


@pytest.mark.parametrize("ckpt", ["qwen3_5_vlm", "qwen3_next"])
def test_tp2_workers_compute_what_one_worker_computes_and_each_holds_its_share(request, ckpt):
    """Greedy decoding of two sequences stepped together, through the worker's requests: the two
    ranks' logits equal one rank's at every step and pick the same tokens; each rank holds the
    replicated weights plus half of the rest, and half of every state slot."""
    path = request.getfixturevalue(ckpt)
    plan = _plan()
    one = run_tp_steps(path, 1, plan, SLOTS)
    two = run_tp_steps(path, 2, with_sampled_tokens(plan, one.tokens), SLOTS)

    assert [len(s) for s in one.logits] == [len(s) for s in plan]  # every step ran, each sequence's row
    assert torch.tensor(one.logits[-1]).std() > 0.3, "logits are flat: the checkpoint was not re-randomised"
    assert two.tokens == one.tokens  # rank 0 of the group chose what the lone rank chose
    sampled = [t for step in one.tokens for t in step if t >= 0]
    assert len(sampled) == 2 * (DECODES + 1) and len(set(sampled)) > 2  # greedy, not stuck on one token
    for i, (a, b) in enumerate(zip(one.logits, two.logits, strict=True)):
        assert rel_err(a, b) < SAME, f"step {i}"

    cfg = ModelConfig.from_hf_dir(path)
    h, hd, dv = cfg.hidden_size, cfg.head_dim, cfg.linear_value_head_dim
    replicated = 4 * (  # float32: embeddings, lm_head, every norm (the DeltaNet's is per value head)
        cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
        + h * (2 * cfg.num_layers + 1)
        + 2 * hd * cfg.kv_layers
        + dv * cfg.linear_layers
    )
    assert two.param_bytes[0] == two.param_bytes[1] == (one.param_bytes[0] - replicated) // 2 + replicated
    assert two.state_bytes == [one.state_bytes[0] // 2] * 2 == [SLOTS * cfg.state_slot_bytes(2, "float32")] * 2


# -- through the server -------------------------------------------------------------------------------

HI = [{"role": "user", "content": "The capital of France is Paris. Hello, world!"}]


def _odd_linear_heads(src: Path, dst: Path) -> Path:
    """``src`` with 3 DeltaNet key heads in its config: no split in two keeps whole key-head groups
    (its weights are never read: the leader refuses it first)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    raw = json.loads((src / "config.json").read_text())
    text = raw.get("text_config", raw)  # VLM-shaped: the text model's shape is nested
    text["linear_num_key_heads"] = text["linear_num_value_heads"] = 3
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


@pytest.fixture(scope="module")
def hybrid_tp_server(tmp_path_factory, qwen3_5_vlm):
    train_tiny_tokenizer(qwen3_5_vlm)
    write_chatml_tokenizer_config(qwen3_5_vlm)
    odd = _odd_linear_heads(qwen3_5_vlm, tmp_path_factory.mktemp("odd") / "m")
    models = "".join(
        f'[[models]]\nid = "{mid}"\npath = "{path}"\ntensor_parallel = {tp}\npreload = true\n\n'
        for mid, path, tp in [("h-tp1", qwen3_5_vlm, 1), ("h-tp2", qwen3_5_vlm, 2), ("odd-linear", odd, 2)]
    )
    srv = Server(
        tmp_path_factory.mktemp("h-tp-srv"),
        models,
        "[engine]\nmax_seqs = 4\nprefill_chunk = 16\nkv_cache_mb = 8\n",  # the prompt takes several chunks
        devices='["cpu", "cpu"]',
    )
    try:
        srv.wait_http()
        _wait_settled(srv)
        yield srv
    finally:
        srv.stop()


def _wait_settled(srv: Server, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        models = {m["id"]: m for m in srv.health()["models"]}
        if [models[m]["status"] for m in ("h-tp1", "h-tp2", "odd-linear")] == ["loaded", "loaded", "failed"]:
            return models
        time.sleep(0.3)
    raise TimeoutError(f"{models}\n{srv.logs()}")


def test_a_served_hybrid_model_with_tp2_answers_the_same_greedy_text_as_tp1(hybrid_tp_server):
    client = openai.OpenAI(base_url=hybrid_tp_server.url + "/v1", api_key="unused", max_retries=0)

    def chat(model: str) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(
            model=model, messages=HI, temperature=0, max_tokens=16, extra_body={"ignore_eos": True}
        )

    one, two = chat("h-tp1"), chat("h-tp2")
    assert one.usage.prompt_tokens > 16  # prefilled in several chunks, the state carried between them
    assert two.usage.completion_tokens == 16
    assert two.choices[0].message.content == one.choices[0].message.content
    assert one.choices[0].message.content

    models = {m["id"]: m for m in httpx.get(hybrid_tp_server.url + "/models", timeout=30).json()["models"]}
    assert models["h-tp2"]["devices"] == ["cpu", "cpu"] and len(models["h-tp2"]["rank_bytes"]) == 2


def test_a_hybrid_model_whose_linear_heads_cannot_split_is_refused_at_load(hybrid_tp_server):
    model = {m["id"]: m for m in hybrid_tp_server.health()["models"]}["odd-linear"]
    assert model["status"] == "failed"
    assert model["error"] == "odd-linear: linear_num_key_heads=3 (value heads 3) cannot split across tensor_parallel=2"

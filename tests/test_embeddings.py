"""POST /v1/embeddings: per input, the model's last-token hidden state after its final norm,
L2-normalised, as HF transformers computes it on the same checkpoint; text tokenized as the model's
tokenizer frames a whole input (its post-processor appends EOS, as Qwen3-Embedding's does); text and
token ids alike; float and base64 alike; bad inputs are 400s naming the field; running streams are
untouched."""

from __future__ import annotations

import base64
import json
import math
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import numpy as np
import openai
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

from cortex.api.embeddings import EmbeddingRequest, render
from cortex.chat.tokenizer import from_gguf_fields
from rpc.messages import Embeddings, EmbedStep
from tests.checkpoints import hf_model
from tests.conftest import Server
from workers import native
from workers.arch import ModelConfig, model_class
from workers.kv_cache import PagedKVCache
from workers.seams import STEP_DELAY_ENV
from workers.weights import load_weights
from workers.worker import ResidentModel, Worker

TOL = 1e-4
HIDDEN = 64
EOS = 2  # <|im_end|> in tests/conftest.py's tiny tokenizer  # tests/checkpoints.py: tiny_config
MAX_CONTEXT = 128
TEXTS = [
    "The capital of France is Paris.",
    "def f(x): return x * 2",
    # longer than max_batch_tokens (32): the worker runs it in pieces
    " ".join(["Hello, world! How are you today? The capital of France is Paris."] * 5),
    "Hi",
]


@pytest.fixture(scope="module")
def embed_qwen3(tmp_path_factory, tiny_qwen3):
    """The tiny Qwen3 with a tokenizer that ends each input with EOS, as Qwen3-Embedding's does
    (its tokenizer.json's post-processor appends the <|endoftext|> whose state the model pools)."""
    d = tmp_path_factory.mktemp("tiny-embed")
    shutil.copytree(tiny_qwen3, d, dirs_exist_ok=True)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    eos = "<|im_end|>"
    tok.post_processor = TemplateProcessing(single=f"$A:0 {eos}:0", special_tokens=[(eos, tok.token_to_id(eos))])
    tok.save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_qwen3, embed_qwen3):
    """The tiny Qwen3, not preloaded (the first embedding request loads it); small batches. The
    same weights twice: "tiny" serves embeddings (task = "embed", its tokenizer appending EOS),
    "tiny-chat" generates."""
    root = tmp_path_factory.mktemp("embeddings")
    models = (
        f'[[models]]\nid = "tiny"\npath = "{embed_qwen3}"\nmax_context = {MAX_CONTEXT}\ntask = "embed"\n'
        f'[[models]]\nid = "tiny-chat"\npath = "{tiny_qwen3}"\nmax_context = {MAX_CONTEXT}\n'
    )
    extra = "[engine]\nmax_batch_tokens = 32\nprefill_chunk = 16\nkv_cache_mb = 8\nmax_requests_per_client = 0\n"
    srv = Server(root, models, extra, env={STEP_DELAY_ENV: "0.03"})  # streams last a while
    try:
        srv.wait_http()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def reference(tiny_qwen3, embed_qwen3):
    """What transformers computes: the last token's final-norm hidden state, L2-normalised; and the
    ids the model's tokenizer.json gives a whole text (ending with EOS), read by the tokenizers
    library itself (transformers 5's Qwen2Tokenizer would swap in its own pre-tokenizer)."""
    model, tok = hf_model(tiny_qwen3), Tokenizer.from_file(str(embed_qwen3 / "tokenizer.json"))

    def embed(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            h = model.model(torch.tensor([ids])).last_hidden_state[0, -1]
        return torch.nn.functional.normalize(h, dim=-1).numpy()

    return embed, lambda text: tok.encode(text).ids


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _post(srv, body: dict) -> httpx.Response:
    return httpx.post(srv.url + "/v1/embeddings", json={"model": "tiny", **body}, timeout=120)


def _timed_post(srv, body: dict) -> tuple[httpx.Response, float]:
    return _post(srv, body), time.monotonic()


def _model_status(srv) -> str:
    return next(m["status"] for m in srv.health()["models"] if m["id"] == "tiny")


def test_a_cold_model_loads_and_each_vector_is_the_reference_last_token_state(server, reference):
    embed, tok = reference
    assert _model_status(server) == "unloaded"
    got = _client(server).embeddings.create(model="tiny", input=TEXTS)  # the SDK asks for base64
    assert _model_status(server) == "loaded"
    assert got.object == "list" and got.model == "tiny"
    assert [d.index for d in got.data] == list(range(len(TEXTS)))
    ids = [tok(t) for t in TEXTS]
    assert all(i[-1] == EOS for i in ids)
    assert len(ids[2]) > 32  # the long one really is run in pieces
    assert got.usage.prompt_tokens == got.usage.total_tokens == sum(len(i) for i in ids)
    for d, one in zip(got.data, ids, strict=True):
        vec, want = np.array(d.embedding), embed(one)
        assert vec.shape == (HIDDEN,)
        assert abs(np.linalg.norm(vec) - 1) < 1e-5
        assert np.dot(vec, want) / np.linalg.norm(want) > 0.9999 and np.abs(vec - want).max() < TOL


def test_token_ids_give_what_their_text_gives(server, reference):
    _, tok = reference
    client = _client(server)
    by_text = client.embeddings.create(model="tiny", input=TEXTS[:2]).data
    by_ids = client.embeddings.create(model="tiny", input=[tok(t) for t in TEXTS[:2]]).data  # taken as given
    one = client.embeddings.create(model="tiny", input=tok(TEXTS[1])).data  # one array of ids
    single = client.embeddings.create(model="tiny", input=TEXTS[1]).data  # one string
    assert len(one) == len(single) == 1
    for a, b in zip(by_text, by_ids, strict=True):
        assert np.abs(np.array(a.embedding) - np.array(b.embedding)).max() < 1e-6
    assert np.abs(np.array(one[0].embedding) - np.array(by_text[1].embedding)).max() < 1e-6
    assert np.abs(np.array(single[0].embedding) - np.array(by_text[1].embedding)).max() < 1e-6


def test_base64_is_the_float32_bytes_of_the_float_vectors(server):
    floats = _post(server, {"input": TEXTS, "encoding_format": "float"})
    packed = _post(server, {"input": TEXTS, "encoding_format": "base64"})
    assert floats.status_code == packed.status_code == 200, floats.text + packed.text
    for f, p in zip(floats.json()["data"], packed.json()["data"], strict=True):
        assert isinstance(p["embedding"], str)
        decoded = np.frombuffer(base64.b64decode(p["embedding"]), dtype="<f4")
        assert np.array_equal(decoded, np.array(f["embedding"], dtype=np.float32))
    assert floats.json()["usage"] == packed.json()["usage"]


def test_dimensions_keeps_the_first_features_normalised_again(server):
    full = np.array(_post(server, {"input": TEXTS[0]}).json()["data"][0]["embedding"])
    r = _post(server, {"input": TEXTS[0], "dimensions": 16})
    assert r.status_code == 200, r.text
    cut = np.array(r.json()["data"][0]["embedding"])
    assert cut.shape == (16,) and abs(np.linalg.norm(cut) - 1) < 1e-5
    assert np.abs(cut - full[:16] / np.linalg.norm(full[:16])).max() < 1e-6
    assert _post(server, {"input": TEXTS[0], "dimensions": HIDDEN}).status_code == 200
    too_many = _post(server, {"input": TEXTS[0], "dimensions": HIDDEN + 1})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "dimensions", too_many.text
    assert str(HIDDEN) in too_many.json()["error"]["message"]


CONTEXT = "context_length_exceeded"


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"input": []}, "input", "invalid_value"),
        ({"input": [[]]}, "input", "invalid_value"),
        ({"input": [1, "a"]}, "input", "invalid_value"),
        ({"input": 7}, "input", "invalid_value"),
        ({"input": [True]}, "input", "invalid_value"),
        ({"input": ["fine", ""]}, "input[1]", "invalid_value"),
        ({"input": ""}, "input", "invalid_value"),
        ({"input": [[5, 6], [99999]]}, "input[1]", None),  # outside the vocabulary
        ({"input": [[5] * (MAX_CONTEXT + 1)]}, "input", CONTEXT),
        ({"input": ["ok", "word " * 200]}, "input[1]", CONTEXT),
        ({"input": "hi", "encoding_format": "hex"}, "encoding_format", "invalid_value"),
        ({"input": "hi", "dimensions": 0}, "dimensions", "invalid_value"),
        ({}, "input", "missing_required_parameter"),
    ],
    ids=lambda x: repr(x)[:40],
)
def test_bad_inputs_are_400s_naming_the_field(server, body, param, code):
    r = _post(server, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error"), err
    if code == CONTEXT:
        assert f"maximum context length is {MAX_CONTEXT} tokens" in err["message"], err


def test_an_unknown_model_is_a_404(server):
    with pytest.raises(openai.NotFoundError):
        _client(server).embeddings.create(model="no-such-model", input="hi")


def test_a_generate_model_does_not_serve_embeddings(server):
    with pytest.raises(openai.BadRequestError) as err:
        _client(server).embeddings.create(model="tiny-chat", input="hi")
    assert err.value.status_code == 400 and err.value.body["type"] == "invalid_request_error"
    message = err.value.body["message"]
    assert "'tiny-chat' does not serve embeddings" in message and "'generate'" in message, message


def test_an_embed_model_does_not_generate_in_any_dialect(server):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as err:
        _client(server).chat.completions.create(model="tiny", messages=messages, max_tokens=4)
    assert "'tiny' serves embeddings only" in err.value.body["message"] and "'embed'" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        _client(server).completions.create(model="tiny", prompt="hi", max_tokens=4)
    with pytest.raises(openai.BadRequestError) as err:
        _client(server).responses.create(model="tiny", input="hi", max_output_tokens=4)
    assert "'tiny' serves embeddings only" in err.value.body["message"]
    claude = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model="tiny", max_tokens=4, messages=messages)
    assert err.value.body["error"]["type"] == "invalid_request_error"
    assert "'tiny' serves embeddings only" in err.value.body["error"]["message"]


def test_the_model_list_shows_each_task(server):
    listed = {m.id: m.model_extra["task"] for m in _client(server).models.list()}
    assert listed == {"tiny": "embed", "tiny-chat": "generate"}


def test_a_chat_stream_running_alongside_is_unaffected(server):
    chat = {
        "model": "tiny-chat",  # the same checkpoint as "tiny", generating
        "messages": [{"role": "user", "content": "Hello, world! How are you today?"}],
        "max_tokens": 60,
        "ignore_eos": True,
        "temperature": 0,
        "logprobs": True,  # the tokens themselves, even those that decode to no text
        "stream": True,
    }

    def stream(started: threading.Event | None = None) -> tuple[str, float]:
        text = []
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=chat, timeout=120) as r:
            assert r.status_code == 200
            for raw in r.iter_lines():  # as they come (read_sse reads the whole stream first)
                if not raw.startswith("data: ") or raw == "data: [DONE]":
                    continue
                if started is not None:
                    started.set()
                for c in json.loads(raw[len("data: ") :])["choices"]:
                    text.append(c["delta"].get("content") or "")
                    text += [t["token"] for t in (c["logprobs"] or {}).get("content") or ()]
        return "".join(text), time.monotonic()

    alone, _ = stream()
    assert len(alone) > 60  # at least every token
    want = _post(server, {"input": TEXTS, "encoding_format": "float"}).json()["data"]
    started = threading.Event()
    with ThreadPoolExecutor(4) as pool:
        running = pool.submit(stream, started)
        assert started.wait(120)
        embeds = [pool.submit(_timed_post, server, {"input": TEXTS, "encoding_format": "float"}) for _ in range(3)]
        text, stream_ended = running.result()
        assert text == alone
        for e in embeds:
            r, ended = e.result()
            assert ended < stream_ended  # served between the stream's steps, not after it
            assert r.status_code == 200, r.text
            for a, b in zip(r.json()["data"], want, strict=True):
                assert np.abs(np.array(a["embedding"]) - np.array(b["embedding"])).max() < 1e-6
    assert server.health()["status"] == "ok"


# -- the worker: pieces, groups and both attention paths -----------------------------------------------


@pytest.mark.parametrize("native_kernels", [True, False], ids=["native", "pytorch"])
def test_the_worker_embeds_in_pieces_and_groups_what_transformers_computes(
    tmp_path, reference, tiny_qwen3, monkeypatch, native_kernels
):
    """``EmbedStep`` with 8 tokens per forward: short sequences share forwards, a long one is run in
    pieces; both the native kernels and PyTorch's SDPA path (what a GPU runs) give the reference."""
    if not native_kernels:
        monkeypatch.setattr(native, "for_tensor", lambda x: None)
        monkeypatch.setattr(native, "kernels", lambda: None)
    embed, _ = reference
    cfg = ModelConfig.from_hf_dir(tiny_qwen3)
    model = model_class(cfg)(cfg)
    load_weights(model, "safetensors", [str(p) for p in tiny_qwen3.glob("*.safetensors")])
    pool = PagedKVCache(*model.kv_shape(), torch.device("cpu"), num_blocks=4)
    before = pool.k.clone()
    worker = Worker("cpu")
    worker.models["m"] = ResidentModel(model, pool, model.tp, 0)
    seqs = [[5, 6, 7], [9], list(range(3, 40)), [11, 12, 13, 14, 15, 16, 17, 18], [4, 4]]
    got = worker.embed(EmbedStep("m", seqs, chunk_tokens=8))
    assert isinstance(got, Embeddings) and got.dim == HIDDEN
    vectors = np.frombuffer(got.vectors, dtype="<f4").reshape(len(seqs), HIDDEN)
    for vec, ids in zip(vectors, seqs, strict=True):
        assert np.abs(vec - embed(ids)).max() < TOL
    assert torch.equal(pool.k, before)  # the model's own pool is never written


def test_a_gguf_tokenizer_that_adds_eos_ends_a_whole_input_with_it():
    """llama.cpp's ``add_eos_token`` (set in Qwen3-Embedding's GGUF files) frames whole inputs only."""
    tokens = ["<|endoftext|>", "h", "i", "hi"]
    fields = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 1, 1, 1],
        "tokenizer.ggml.merges": ["h i"],
        "tokenizer.ggml.eos_token_id": 0,
    }
    assert from_gguf_fields(fields).encode("hi", whole=True) == [3]
    tok = from_gguf_fields({**fields, "tokenizer.ggml.add_eos_token": True})
    assert tok.encode("hi", whole=True) == [3, 0] and tok.encode("hi") == [3]


# -- the front's rendering ------------------------------------------------------------------------------


def test_render_cuts_renormalises_and_packs_little_endian_float32():
    vec = np.array([0.6, 0.0, 0.8, 0.0], dtype="<f4")
    body = EmbeddingRequest(model="m", input="x", dimensions=1)
    assert render(vec.tobytes(), body) == [1.0]
    body = EmbeddingRequest(model="m", input="x", encoding_format="base64")
    assert base64.b64decode(render(vec.tobytes(), body)) == vec.tobytes()
    plain = render(vec.tobytes(), EmbeddingRequest(model="m", input="x"))
    assert all(math.isclose(a, b, rel_tol=1e-7) for a, b in zip(plain, [0.6, 0.0, 0.8, 0.0], strict=True))


@pytest.mark.slow
def test_a_tensor_parallel_model_embeds_what_one_rank_does(tmp_path, tiny_qwen3):
    """Every rank runs the batch (the model is sharded); rank 0's vectors equal the unsharded model's."""
    models = "".join(
        f'[[models]]\nid = "{mid}"\npath = "{tiny_qwen3}"\ntensor_parallel = {tp}\npreload = true\ntask = "embed"\n\n'
        for mid, tp in (("tp1", 1), ("tp2", 2))
    )
    srv = Server(tmp_path, models, "[engine]\nmax_batch_tokens = 32\nkv_cache_mb = 8\n", devices='["cpu", "cpu"]')
    try:
        srv.wait_healthy()
        got = {
            m: httpx.post(
                srv.url + "/v1/embeddings", json={"model": m, "input": TEXTS, "encoding_format": "float"}, timeout=120
            )
            for m in ("tp1", "tp2")
        }
        assert all(r.status_code == 200 for r in got.values()), {m: r.text for m, r in got.items()}
        for a, b in zip(got["tp1"].json()["data"], got["tp2"].json()["data"], strict=True):
            assert np.abs(np.array(a["embedding"]) - np.array(b["embedding"])).max() < 1e-5
    finally:
        srv.stop()

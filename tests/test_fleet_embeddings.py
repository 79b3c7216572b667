"""Embeddings through a gateway that forwards them: two real leaders on loopback.

    G  devices []     : a pure gateway, the node the client calls
    P  devices ["cpu"]: "emb" (task = "embed") resident; every embedding request is forwarded here

API keys are on at both, with the fleet's peer key. The vectors are P's, whichever node the client
called; P counts the inputs' tokens as prompt tokens (cortex_prompt_tokens_total), G counts the
request for the node that served it.
"""

from __future__ import annotations

import numpy as np
import openai
import pytest

from tests.conftest import Server, free_port, scrape, value, wait_for

KEY, PEER_KEY = "sk-client-1", "fleet-secret"
FLEET = f'[fleet]\npoll_interval_s = 0.3\npoll_timeout_s = 10\npeer_key = "{PEER_KEY}"\n'
KEYS = f'api_keys = ["{KEY}"]\n'
TEXTS = ["Hello, world! How are you today?", "def f(x): return x * 2"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_qwen3):
    root = tmp_path_factory.mktemp("fleet-embeddings")
    (root / "p").mkdir()
    (root / "g").mkdir()
    p_port = free_port()
    models = f'[[models]]\nid = "emb"\npath = "{tiny_qwen3}"\nmax_context = 128\ntask = "embed"\npreload = true\n'
    p = Server(root / "p", models, KEYS + FLEET, name="P", port=p_port)
    peers = f'[[peers]]\nname = "P"\nendpoint = "http://127.0.0.1:{p_port}"\n'
    g = Server(root / "g", "", KEYS + FLEET + peers, name="G", devices="[]")
    try:
        p.wait_healthy()
        g.wait_http()
        wait_for(lambda: _resident_on(g) == ["P"], what="the gateway to see emb on P")
        yield g, p
    finally:
        g.stop()
        p.stop()


def _oai(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _resident_on(srv: Server) -> list[str]:
    return next((m.model_extra["resident_on"] for m in _oai(srv).models.list() if m.id == "emb"), [])


def test_embeddings_through_the_gateway_are_the_peers(pair):
    g, p = pair
    before = scrape(p.metrics_url)
    raw = _oai(g).embeddings.with_raw_response.create(model="emb", input=TEXTS, encoding_format="float")
    assert raw.headers["x-cortex-upstream"] == "P"
    via_g = raw.parse()
    direct = _oai(p).embeddings.create(model="emb", input=TEXTS, encoding_format="float")
    assert [d.index for d in via_g.data] == [0, 1] and via_g.usage == direct.usage
    for a, b in zip(via_g.data, direct.data, strict=True):
        assert np.array_equal(np.array(a.embedding), np.array(b.embedding))
    # the peer counts both requests' inputs as prompt tokens; the gateway counts the request for P
    after = scrape(p.metrics_url)
    counted = value(after, "cortex_prompt_tokens_total", model="emb") - value(
        before, "cortex_prompt_tokens_total", model="emb"
    )
    assert counted == 2 * direct.usage.prompt_tokens > 0
    assert value(scrape(g.metrics_url), "cortex_requests_total", endpoint="embeddings", node="P", status="200") == 1

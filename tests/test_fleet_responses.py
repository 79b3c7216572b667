"""The Responses API through a gateway that forwards it: two real leaders on loopback.

    G  devices []     : a pure gateway, the node the client calls
    P  devices ["cpu"]: tiny resident (preloaded); every generation is forwarded here

API keys are on at both, with the fleet's peer key. A response generated on P is kept by G, the
node the client called (cortex/api/responses.py says why), so GET, DELETE and
previous_response_id through G find it; P keeps nothing, and a continued conversation reaches P
in the forwarded body.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import Server, free_port, tiny_models_toml, wait_for

KEY, PEER_KEY = "sk-client-1", "fleet-secret"
FLEET = f'[fleet]\npoll_interval_s = 0.3\npoll_timeout_s = 10\npeer_key = "{PEER_KEY}"\n'
KEYS = f'api_keys = ["{KEY}"]\n'


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_qwen3):
    root = tmp_path_factory.mktemp("fleet-responses")
    (root / "p").mkdir()
    (root / "g").mkdir()
    p_port = free_port()
    p = Server(root / "p", tiny_models_toml(tiny_qwen3), KEYS + FLEET, name="P", port=p_port)
    peers = f'[[peers]]\nname = "P"\nendpoint = "http://127.0.0.1:{p_port}"\n'
    g = Server(root / "g", "", KEYS + FLEET + peers, name="G", devices="[]")
    try:
        p.wait_healthy()
        g.wait_http()
        wait_for(lambda: _resident_on(g) == ["P"], what="the gateway to see tiny on P")
        yield g, p
    finally:
        g.stop()
        p.stop()


def _resident_on(srv: Server) -> list[str]:
    r = httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    return next((m["resident_on"] for m in r.json().get("data", ()) if m["id"] == "tiny"), [])


def _oai(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


ASK = [{"role": "user", "content": "Hello, world! How are you today?"}]


def test_a_forwarded_response_is_kept_by_the_node_the_client_called(pair):
    g, p = pair
    raw = _oai(g).responses.with_raw_response.create(model="tiny", input=ASK, max_output_tokens=6, temperature=0)
    assert raw.headers["x-cortex-upstream"] == "P"  # generated on P
    first = raw.parse()
    got = _oai(g).responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text and got.usage == first.usage
    with pytest.raises(openai.NotFoundError):
        _oai(p).responses.retrieve(first.id)  # P kept nothing: one copy, where the client asks for it


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_previous_response_id_through_the_gateway_continues_on_the_peer(pair, stream):
    g, p = pair
    client = _oai(g)
    first = client.responses.create(model="tiny", input=ASK, max_output_tokens=6, temperature=0)
    more = [{"role": "user", "content": "And then?"}]
    ask = {"model": "tiny", "max_output_tokens": 6, "temperature": 0}
    if stream:
        with client.responses.create(previous_response_id=first.id, input=more, stream=True, **ask) as events:
            second = [e for e in events][-1].response  # cut short: response.incomplete ends it
    else:
        second = client.responses.create(previous_response_id=first.id, input=more, **ask)
    assert second.previous_response_id == first.id
    # the peer was given the whole conversation: the same prompt as the conversation sent whole
    whole = [*ASK, {"role": "assistant", "content": first.output_text}, *more]
    alone = client.responses.create(input=whole, store=False, **ask)
    assert second.usage.input_tokens == alone.usage.input_tokens and second.output_text == alone.output_text
    assert client.responses.retrieve(second.id).output_text == second.output_text
    # and the third turn continues the second, kept the same way
    third = client.responses.create(previous_response_id=second.id, input="Go on.", **ask)
    assert third.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens
    with pytest.raises(openai.BadRequestError):  # P never kept the conversation
        _oai(p).responses.create(previous_response_id=first.id, input=more, **ask)


def test_delete_through_the_gateway_removes_the_only_copy(pair):
    g, _ = pair
    client = _oai(g)
    r = client.responses.create(model="tiny", input=ASK, max_output_tokens=4, temperature=0)
    assert client.responses.delete(r.id) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="tiny", previous_response_id=r.id, input="Again.", max_output_tokens=4)
    assert err.value.body["param"] == "previous_response_id"


def test_only_a_peer_may_carry_a_conversation(pair):
    """A client's own ``x_cortex_history`` is ignored: its previous_response_id must be its own."""
    _, p = pair
    body = {
        "model": "tiny",
        "input": "Hi",
        "previous_response_id": "resp_made_up",
        "x_cortex_history": [{"role": "user", "content": "I said this, honestly."}],
        "max_output_tokens": 4,
    }
    for headers in ({}, {"X-Cortex-Hop": "G"}):
        r = httpx.post(
            p.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {KEY}", **headers}, timeout=60
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id", r.text

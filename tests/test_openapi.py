"""GET /openapi.json: a valid OpenAPI 3.1 document that names exactly the routes the app serves."""

from __future__ import annotations

import re

import falcon
import httpx
import pytest
from falcon.inspect import inspect_app
from openapi_spec_validator import OpenAPIV31SpecValidator, validate

from cortex.api.app import create_app
from cortex.api.openapi import OpenApiDocument, document

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
SETTINGS = {
    "engine": "ipc:///nonexistent/engine.sock",  # never contacted: the app is only inspected
    "event_timeout_s": 1.0,
    "max_body_bytes": 1 << 20,
    "load_timeout_s": 1.0,
    "node": "test",
}


@pytest.fixture(scope="module")
def app() -> falcon.App:
    app = create_app(SETTINGS)
    if "/openapi.json" not in _routes(app):  # until app.py registers it
        app.add_route("/openapi.json", OpenApiDocument())
    return app


def _routes(app: falcon.App) -> dict[str, set[str]]:
    """Path template (converters dropped, as OpenAPI writes it) -> the methods it answers."""
    out = {}
    for route in inspect_app(app).routes:
        path = re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", route.path)
        out.setdefault(path, set()).update(m.method.lower() for m in route.methods if not m.internal)
    return out


def _documented(doc: dict) -> dict[str, set[str]]:
    return {path: {m for m in item if m in METHODS} for path, item in doc["paths"].items()}


def test_document_is_valid_openapi_3_1():
    doc = document()
    assert doc["openapi"].startswith("3.1")
    validate(doc, cls=OpenAPIV31SpecValidator)


def test_every_ref_resolves():
    """Every $ref names a component that exists, wherever it sits (contentSchema included)."""
    doc = document()

    def resolve(ref: str):
        node = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        return node

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                assert resolve(node["$ref"]) is not None, node["$ref"]
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)


def test_every_route_is_documented_and_every_documented_path_is_a_route(app):
    served, documented = _routes(app), _documented(document())
    undocumented = {p: sorted(m) for p, m in served.items() if documented.get(p) != m}
    assert not undocumented, f"routes (and methods) missing from the document: {undocumented}"
    unserved = {p: sorted(m) for p, m in documented.items() if p not in served}
    assert not unserved, f"documented paths the app does not serve: {unserved}"


def test_every_operation_has_an_id_and_declares_its_errors():
    doc = document()
    ids = [op["operationId"] for item in doc["paths"].values() for m, op in item.items() if m in METHODS]
    assert len(ids) == len(set(ids))
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in METHODS and "requestBody" in op:
                assert {"400", "413"} <= set(op["responses"]), f"{method} {path}"
                anthropic = path.startswith("/v1/messages")
                envelope = "Anthropic" if anthropic else "OpenAI"
                assert op["responses"]["400"]["$ref"].endswith(f"/{envelope}400"), f"{method} {path}"


def test_errors_in_the_document_match_the_server_envelope():
    """The OpenAI error schema is what cortex.api.errors renders."""
    from jsonschema import Draft202012Validator

    from cortex.api.errors import ApiError

    doc = document()
    schema = {**doc["components"]["schemas"]["OpenAIError"], "components": doc["components"]}
    body = ApiError(503, "loading", "service_unavailable", "model_loading", retry_after=5).body()
    Draft202012Validator(schema).validate(body)


def test_the_app_serves_the_document(app):
    from falcon import testing

    r = testing.TestClient(app).simulate_get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert r.json == document()


def test_the_running_server_serves_the_document(tiny_server):
    r = httpx.get(tiny_server.url + "/openapi.json", timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == document()


def test_a_running_servers_health_matches_its_schema(tiny_server):
    """/health of a node with a loaded model: every field the document describes, typed as it says."""
    from jsonschema import Draft202012Validator

    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(tiny_server.url + "/v1/chat/completions", json=chat, timeout=60).status_code == 200
    health = httpx.get(tiny_server.url + "/health", timeout=30).json()
    doc = document()
    Draft202012Validator({**doc["components"]["schemas"]["Health"], "components": doc["components"]}).validate(health)
    assert health["models"][0]["engine"]["kv_dtype"] in ("float32", "float16", "bfloat16")

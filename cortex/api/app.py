"""The WSGI app gunicorn serves: ``cortex.api.app:create_app()``.

Its settings come from the leader through one environment variable (CORTEX_FRONT, JSON), so
gunicorn workers never read config files themselves and always agree with the leader. What a
reload may change while serving (API keys, open paths) comes from a file the leader rewrites
(``auth_file``), so new keys apply without restarting the front or dropping a connection.
"""

from __future__ import annotations

import json
import os

import falcon

from cortex.api import errors
from cortex.api.anthropic import CountTokens, Messages
from cortex.api.auth import ApiKeys
from cortex.api.embeddings import Embeddings
from cortex.api.engine_client import EngineClient
from cortex.api.generation import client_id
from cortex.api.health import Health
from cortex.api.manage import ModelLoad, ModelTable
from cortex.api.models import Fleet, Models
from cortex.api.openai import ChatCompletions, Completions
from cortex.api.openapi import OpenApiDocument
from cortex.api.response_store import ResponseStore, StoredResponses
from cortex.api.responses import Responses
from cortex.fleet.proxy import ForwardTo, Proxy
from cortex.fleet.relay import Relay
from cortex.ops import logs
from cortex.ops.reqlog import RequestLog, request_ref
from cortex.ops.scrape import MetricsProxy

ENV = "CORTEX_FRONT"


class RequestIds:
    """Falcon middleware: every response names its request (``request-id``, as Anthropic's API
    does, and ``x-request-id``), whatever its status; a client's own ``x-request-id`` is kept."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.request_ref = request_ref(req.get_header("x-request-id"))

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool) -> None:
        ref = req.context.get("request_ref") or request_ref(None)
        resp.set_header("request-id", ref)
        resp.set_header("x-request-id", ref)


class FrontApp(falcon.App):
    """Falcon's app, carrying the fast path for forwarded requests that its gunicorn worker tries
    before it parses a request (cortex/fleet/relay.py, cortex/api/serve.py); None: there is none."""

    __slots__ = ("relay",)


def create_app(settings: dict | None = None) -> FrontApp:
    s = settings or json.loads(os.environ[ENV])
    if settings is None:  # a gunicorn worker: its own log setup (gunicorn configures only its own loggers)
        logs.setup(s.get("log_level", "INFO"), s.get("log_format", "text"))
    engine = EngineClient(s["engine"], s["event_timeout_s"], s.get("load_timeout_s", 900.0), s.get("leader_pid"))
    auth = ApiKeys(
        s.get("api_key_digests", []),
        s.get("open_paths", ["/health", "/metrics"]),
        s.get("admin_key_digests", []),
        s.get("auth_file"),
        peer_digest=s.get("peer_key_digest", ""),
    )
    requests = RequestLog(s.get("node", "cortex"), s.get("log_content", False))
    # the request log first: it also sees the requests the key check refuses
    app = FrontApp(media_type=falcon.MEDIA_JSON, middleware=[RequestIds(), requests, auth])
    app.req_options.strip_url_path_trailing_slash = True
    errors.install(app)
    proxy = Proxy(
        s.get("node", "cortex"),
        engine.report_peer_failure,
        s.get("connect_timeout_s", 2.0),
        s.get("load_timeout_s", 900.0),  # a peer may be cold-loading the model before its first byte
        client_id,
        engine.routes.forget,
    )
    app.add_error_handler(ForwardTo, proxy.handle)
    models = Models(engine)
    body, keepalive = s["max_body_bytes"], s.get("keepalive_s", 10.0)
    # with log_content the log line carries the prompt, which only the ordinary path takes apart
    app.relay = None if s.get("log_content") else Relay(proxy, engine.routes, auth, s.get("node", "cortex"), body)
    app.add_route("/v1/chat/completions", ChatCompletions(engine, body, keepalive))
    app.add_route("/v1/completions", Completions(engine, body, keepalive))
    app.add_route("/v1/embeddings", Embeddings(engine, body))
    # shared by this node's worker processes (SQLite in the run dir); off without a path or with max 0
    store = ResponseStore(
        s.get("responses_store"), s.get("responses_store_max", 0), s.get("responses_store_ttl_s", 3600.0)
    )
    app.add_route("/v1/responses", Responses(engine, body, keepalive, store))
    app.add_route("/v1/responses/{response_id}", StoredResponses(store))
    app.add_route("/v1/messages", Messages(engine, body, keepalive))
    app.add_route("/v1/messages/count_tokens", CountTokens(engine, body))
    app.add_route("/openapi.json", OpenApiDocument())
    app.add_route("/v1/models", models)
    app.add_route("/v1/models/{model_id:path}", models, suffix="one")
    health = Health(engine)
    app.add_route("/health", health)
    app.add_route("/health/live", health, suffix="live")
    if s.get("metrics_url"):
        app.add_route("/metrics", MetricsProxy(s["metrics_url"]))
    app.add_route("/fleet", Fleet(engine))
    app.add_route("/models", ModelTable(engine))
    app.add_route("/models/load", ModelLoad(engine, body, s["load_timeout_s"], "load"))
    for op in ("unload", "pin", "unpin", "evict"):
        app.add_route(f"/models/{op}", ModelLoad(engine, body, 60.0, op))
    return app

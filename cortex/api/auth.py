"""API keys: ``Authorization: Bearer <key>`` (OpenAI SDKs) or ``x-api-key`` (Anthropic SDKs).

The front holds SHA-256 digests of the configured keys, never the keys, and never logs what a
client sent. A refused request gets 401 in the dialect of the endpoint it called.

The management API (``/models``, ``/models/load``, ``/models/unload``) changes what the node holds
for everyone, so once any key is configured it takes an admin key (``[gateway] admin_keys``): an
API key there gets 403.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os

import falcon

from cortex.api.errors import ApiError
from cortex.fleet.proxy import HOP

LIVENESS = "/health/live"  # always open: a liveness probe carries no key, and the answer says nothing


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(key: str) -> str:
    """How a request's client is named to the leader (per-key limits, request log): a short hash
    of its API key, the same whether it came as ``Authorization: Bearer`` or ``X-Api-Key``."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]


def presented_key(req: falcon.Request) -> str | None:
    return key_in(req.get_header("Authorization"), req.get_header("X-Api-Key"))


def key_in(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key a request presents: ``Authorization: Bearer <key>``, else ``X-Api-Key``."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None
    return x_api_key


def is_admin_path(path: str) -> bool:
    return path == "/models" or path.startswith("/models/")


def _matches(sent: bytes, digests: list[bytes]) -> bool:
    # compare against every key, in constant time, so timing says nothing about which matched
    return any([hmac.compare_digest(sent, d) for d in digests])  # noqa: C419


def write_auth_file(
    path: str | os.PathLike,
    keys: tuple[str, ...],
    admin_keys: tuple[str, ...],
    open_paths: tuple[str, ...],
    peer_key: str = "",
) -> None:
    """What the front needs to check keys (digests only), written whole or not at all (rename), so
    a front process never reads half a file. The leader writes it at start and on every reload.

    ``peer_key`` (the fleet's credential) is accepted as one more API key, and only when keys are on
    at all: with no keys every request passes, and a peer key alone must not switch them on."""
    peer = [digest(peer_key)] if peer_key and keys else []
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(
            {
                "api_key_digests": [digest(k) for k in keys] + peer,
                "admin_key_digests": [digest(k) for k in admin_keys],
                "open_paths": list(open_paths),
                "peer_key_digest": peer[0] if peer else "",
            },
            f,
        )
    os.replace(tmp, path)


class ApiKeys:
    """Falcon middleware; with no keys configured every request passes.

    With ``path`` (the leader's auth file), keys and open paths follow that file: one stat per
    request notices a rewrite, so a reload's new keys apply to the next request.

    It also marks requests that come from a peer leader (``req.context.from_peer``): those
    presenting the fleet's peer key, or, with no keys at all, those carrying the hop header."""

    def __init__(
        self,
        digests: list[str],
        open_paths: list[str],
        admin_digests: list[str] | None = None,
        path: str | None = None,
        peer_digest: str = "",
    ):
        self.digests = [d.encode() for d in digests]
        self.admin_digests = [d.encode() for d in admin_digests or ()]
        self.open_paths = tuple(open_paths)
        self.path, self.stamp = path, None
        self.peer_digest = peer_digest.encode()

    def _follow_file(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp == self.stamp:
                return
            with open(self.path) as f:
                data = json.load(f)
            digests = [d.encode() for d in data["api_key_digests"]]
            admin_digests = [d.encode() for d in data["admin_key_digests"]]
            open_paths = tuple(data["open_paths"])
            peer_digest = str(data.get("peer_key_digest", "")).encode()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # keep checking with the keys we have: failing open would be worse than stale keys
            logging.getLogger("cortex.front").warning("cannot read %s: %s", self.path, exc)
            return
        self.digests, self.admin_digests, self.open_paths, self.stamp = digests, admin_digests, open_paths, stamp
        self.peer_digest = peer_digest

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.from_peer = self.check(req.method, req.path, presented_key(req), req.get_header(HOP) is not None)

    def check(self, method: str, path: str, key: str | None, hop: bool) -> bool:
        """Whether a request with ``key`` (None: it presents none) may call ``path``: raises
        ApiError (401, 403) when not; returns whether it comes from a peer leader. ``hop``: it
        carries the hop header."""
        if self.path:
            self._follow_file()
        from_peer = not self.digests and hop
        admin = is_admin_path(path)
        if method == "OPTIONS" or path == LIVENESS or path in self.open_paths and not admin:
            return from_peer
        if not self.digests and not (admin and self.admin_digests):
            return from_peer  # admin keys alone protect the management API only
        if key is None:
            raise ApiError(
                401,
                "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
                "authentication_error",
                "missing_api_key",
            )
        sent = digest(key).encode()
        if admin and _matches(sent, self.admin_digests):
            return from_peer
        if not _matches(sent, self.digests + self.admin_digests):
            raise ApiError(401, "Incorrect API key provided.", "authentication_error", "invalid_api_key")
        if admin:
            raise ApiError(
                403,
                "The management API needs an admin key ([gateway] admin_keys); this is an API key.",
                "permission_error",
                "admin_key_required",
            )
        return bool(self.peer_digest) and hmac.compare_digest(sent, self.peer_digest)

"""API keys: ``Authorization: Bearer <key>`` (OpenAI SDKs) or ``x-api-key`` (Anthropic SDKs).

The front holds SHA-256 digests of the configured keys, never the keys, and never logs what a
client sent. A refused request gets 401 in the dialect of the endpoint it called.
"""

from __future__ import annotations

import hashlib
import hmac

import falcon

from cortex.api.errors import ApiError


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def presented_key(req: falcon.Request) -> str | None:
    header = req.get_header("Authorization")
    if header:
        scheme, _, value = header.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None
    return req.get_header("X-Api-Key")


class ApiKeys:
    """Falcon middleware; with no keys configured every request passes."""

    def __init__(self, digests: list[str], open_paths: list[str]):
        self.digests = [d.encode() for d in digests]
        self.open_paths = tuple(open_paths)

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not self.digests or req.path in self.open_paths or req.method == "OPTIONS":
            return
        key = presented_key(req)
        if key is None:
            raise ApiError(
                401,
                "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
                "authentication_error",
                "missing_api_key",
            )
        sent = digest(key).encode()
        # compare against every key, in constant time, so timing says nothing about which matched
        if not any([hmac.compare_digest(sent, d) for d in self.digests]):  # noqa: C419
            raise ApiError(401, "Incorrect API key provided.", "authentication_error", "invalid_api_key")

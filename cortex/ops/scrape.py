"""GET /metrics on the API port too: the front relays the leader's exporter (``metrics_listen``).

One exporter keeps one source of truth; this route only saves a second scrape target where the
API port is the one a Prometheus can reach. It is open (no API key) when ``/metrics`` is among
``[gateway] open_paths``, as by default.
"""

from __future__ import annotations

import urllib.error
import urllib.request

import falcon

from cortex.api.errors import ApiError

TIMEOUT_S = 5.0


class MetricsProxy:
    def __init__(self, url: str):
        self.url = url

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=TIMEOUT_S) as r:
                body, content_type = r.read(), r.headers.get("Content-Type", "text/plain")
        except (urllib.error.URLError, OSError) as exc:
            raise ApiError(
                503, f"the metrics exporter is not answering: {exc}", "server_error", "metrics_unavailable"
            ) from None
        resp.content_type = content_type
        resp.data = body

"""Entry point of the HTTP front process: gunicorn serving ``cortex.api.app:create_app()``.

Started by the leader in a process group of its own, so a terminal's Ctrl-C reaches only the leader,
which stops the front in order; and bound to the leader's life, so it never serves without one.

Its worker class (``JsonErrorWorker``, gunicorn's gthread) answers what gunicorn refuses itself,
before any application code runs (400 bad request line or header, 414, 431 header fields too
large, 501 transfer coding ...), in the API's JSON error envelope instead of gunicorn's HTML page:
Anthropic's for a ``/v1/messages`` path when the request got as far as its path, else OpenAI's.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import SimpleNamespace

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

from cortex.api.errors import ApiError, dialect_of, whole_response
from cortex.fleet.relay import Job, Relay
from rpc.process import die_with_parent

_request = threading.local()  # the request gunicorn is refusing on this thread, when it parsed that far


def json_error(status: int, reason: str, message: str, path: str | None) -> bytes:
    """A whole HTTP response for an error gunicorn answers itself, in the API's envelope."""
    type_ = "invalid_request_error" if status < 500 else "server_error"
    code = reason.lower().replace(" ", "_") or None  # e.g. request_header_fields_too_large
    err = ApiError(status, message or reason, type_, code)
    dialect = dialect_of(SimpleNamespace(path=path)) if path else "openai"  # unknown before the path
    return whole_response(err, dialect, reason=reason)


def _write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """Stands in for ``gunicorn.util.write_error`` (its HTML page) in a front worker process."""
    util.write_nonblock(sock, json_error(status_int, reason, mesg, getattr(_request, "path", None)))


class JsonErrorWorker(ThreadWorker):
    """gunicorn's gthread worker, with its own error answers in JSON (see the module's doc), that
    offers each next request of a keep-alive connection to the forwarding fast path first
    (cortex/fleet/relay.py), on its main thread, before gunicorn's parser reads it."""

    relay: Relay | None = None
    busy = 0  # requests handed to request threads and not yet finished (the main thread counts)

    def enqueue_req(self, conn) -> None:
        self.busy += 1
        super().enqueue_req(conn)

    def finish_request(self, conn, fs) -> None:
        self.busy -= 1
        super().finish_request(conn, fs)

    def load_wsgi(self) -> None:
        super().load_wsgi()
        # the fast path peeks at the request's bytes: never into a TLS stream
        self.relay = None if self.cfg.is_ssl else getattr(self.wsgi, "relay", None)

    def on_client_socket_readable(self, conn, client) -> None:
        """A kept-alive connection has its next request (the main thread): the fast path may take
        it and start it on its way here, then a request thread relays the answer. Else gthread's
        own way: a request thread parses and serves it."""
        job = None
        if self.relay is not None and not conn.is_http2 and not conn.parser.unreader.buf.getvalue():
            job = self._begin(conn)
        if job is None:
            super().on_client_socket_readable(conn, client)
            return
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self.busy += 1
        done = self.tpool.submit(self._finish, conn, job)
        done.add_done_callback(lambda fut: self.method_queue.defer(self.finish_request, conn, fut))

    def _begin(self, conn) -> Job | None:
        # gunicorn's max_requests: this worker's last request closes its connection, as in
        # handle_request, and so do a stopping worker and a full keep-alive list
        last = self.nr + 1 >= self.max_requests
        room = len(self.keepalived_conns) - 1 < self.max_keepalived  # this one is still on the list
        may_keep = bool(self.alive and self.cfg.keepalive) and room and not last
        addr = conn.client[0] if isinstance(conn.client, (tuple, list)) else str(conn.client or "")
        try:
            job = self.relay.begin(conn.sock, addr, may_keep, may_start=self.busy < self.cfg.threads)
        except Exception:  # a defect before the request was taken: gthread's own way serves it
            self.log.exception("forwarding fast path failed")
            return None
        if job is not None:
            self.nr += 1
            if last and self.alive:
                self.log.info("Autorestarting worker after current request.")
                self.alive = False
        return job

    def _finish(self, conn, job: Job) -> bool:
        """A request thread's part: the answer; whether the connection may carry another request."""
        conn.sock.setblocking(True)
        try:
            return self.relay.finish(conn.sock, job)
        except Exception:  # never a worker's end: the client's connection is closed
            self.log.exception("forwarding fast path failed")
            return False

    def init_process(self) -> None:
        # gunicorn's Worker.handle_error writes its answer through util.write_error; in this process
        # (a front worker, forked for this class alone) that is the JSON writer
        util.write_error = _write_json_error
        super().init_process()

    def handle_error(self, req, client, addr, exc) -> None:
        # a bad header carries the request whose line was read (exc.req): its path tells the dialect
        path = getattr(req if req is not None else getattr(exc, "req", None), "path", None)
        _request.path = path if isinstance(path, str) else None
        try:
            super().handle_error(req, client, addr, exc)
        finally:
            _request.path = None


def main() -> None:
    die_with_parent(signal.SIGTERM)  # SIGTERM: gunicorn's graceful stop
    from gunicorn.app.wsgiapp import run

    sys.argv = ["cortex-front", *sys.argv[1:], "cortex.api.app:create_app()"]
    run()


if __name__ == "__main__":
    main()

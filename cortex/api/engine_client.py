"""The front's side of the engine socket: submit a request, iterate its events, cancel on exit.

One DEALER socket per request keeps requests of different threads apart with no locking; ipc
connects are cheap. Every wait has a timeout: a silent leader becomes a 503, not a hung client.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator

import zmq

from cortex.api.errors import ApiError
from rpc.codec import encode
from rpc.engine import Answer, Cancel, Delta, Failure, Finished, ModelOp, Query, Started, Submit
from rpc.messages import Error
from rpc.transport import RpcClient

ANSWER_TIMEOUT_S = 10.0


class EngineClient:
    def __init__(self, endpoint: str, event_timeout_s: float):
        self.endpoint = endpoint
        self.event_timeout_s = event_timeout_s
        self._ctx: zmq.Context | None = None
        self._pid = 0

    def _context(self) -> zmq.Context:
        if self._pid != os.getpid():  # gunicorn forks workers: a context must not cross a fork
            self._ctx, self._pid = zmq.Context(), os.getpid()
        return self._ctx

    def query(self, what: str) -> dict:
        client = RpcClient(self.endpoint, self._context())
        try:
            client.send(Query(what))
            got = client.recv(int(ANSWER_TIMEOUT_S * 1000))
            reply = got[1] if got else None
        finally:
            client.close()
        if not isinstance(reply, Answer):
            raise ApiError(
                503, "the engine is not answering", "service_unavailable", "engine_unavailable", retry_after=5
            )
        return reply.data

    def model_op(self, op: str, model: str, timeout_s: float) -> dict:
        """Load or unload a model; returns its description once done, raises ApiError otherwise."""
        client = RpcClient(self.endpoint, self._context())
        try:
            client.send(ModelOp(op, model))
            got = client.recv(int(timeout_s * 1000))
        finally:
            client.close()
        if got is None:
            raise ApiError(504, f"{op} of {model!r} did not finish within {timeout_s:g}s", "server_error", "timeout")
        if isinstance(got[1], Answer):
            return got[1].data
        raise _as_api_error(got[1])

    def submit(self, req: Submit) -> Generation:
        gen = Generation(RpcClient(self.endpoint, self._context()), req, self.event_timeout_s)
        gen.start()
        return gen


class Generation:
    """Events of one submitted request. Closing it before the end cancels the request."""

    def __init__(self, client: RpcClient, req: Submit, event_timeout_s: float):
        self.client, self.req, self.event_timeout_s = client, req, event_timeout_s
        self.prompt_tokens = 0
        self.done = False

    def _next(self, timeout_s: float, watch: socket.socket | None = None) -> object:
        """The next event. With ``watch`` (the client's connection), a client that hangs up while
        we wait raises ClientGone, so its request is cancelled instead of generated for nobody."""
        if watch is None:
            got = self.client.recv(int(timeout_s * 1000))
        else:
            got = None
            poller = zmq.Poller()
            poller.register(self.client.socket, zmq.POLLIN)
            poller.register(watch, zmq.POLLIN)
            deadline = time.monotonic() + timeout_s
            while got is None and time.monotonic() < deadline:
                ready = dict(poller.poll(max(int((deadline - time.monotonic()) * 1000), 0)))
                if self.client.socket in ready:
                    got = self.client.recv(0)
                elif watch in ready or watch.fileno() in ready:
                    if _hung_up(watch):
                        raise ClientGone()
                    poller.unregister(watch)  # readable but open: a pipelined request; stop watching
        if got is None:
            raise ApiError(
                503, "the engine did not answer in time", "service_unavailable", "engine_timeout", retry_after=5
            )
        return got[1]

    def start(self) -> None:
        """Send the request; raise ApiError if the leader refuses it."""
        self.client.socket.send(encode(self.req))
        try:
            first = self._next(ANSWER_TIMEOUT_S)
        except ApiError:
            self.close()
            raise
        if isinstance(first, Started):
            self.prompt_tokens = first.prompt_tokens
            return
        self.done = True
        self.client.close()
        raise _as_api_error(first)

    def events(self, watch: socket.socket | None = None) -> Iterator[Delta | Finished]:
        """Yield Delta events and one Finished per choice; raise ApiError on a failure (ClientGone
        if ``watch``, the client's connection, closes first)."""
        finished = 0
        try:
            while True:
                ev = self._next(self.event_timeout_s, watch)
                if isinstance(ev, Delta):
                    yield ev
                elif isinstance(ev, Finished):
                    finished += 1
                    self.done = finished == self.req.n
                    yield ev
                    if self.done:
                        return
                else:
                    self.done = True
                    raise _as_api_error(ev)
        finally:
            self.close()

    def close(self) -> None:
        if self.client.socket.closed:
            return
        if not self.done:
            with contextlib.suppress(zmq.ZMQError):
                self.client.socket.send(encode(Cancel(self.req.request_id)), flags=zmq.NOBLOCK)
            self.client.close(linger_ms=500)
            return
        self.client.close()


class ClientGone(Exception):
    """The HTTP client closed its connection; nobody waits for the answer."""


def _hung_up(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _as_api_error(ev: object) -> ApiError:
    if isinstance(ev, Failure):
        return ApiError.from_failure(ev.kind, ev.message, ev.retry_after)
    if isinstance(ev, Error):
        return ApiError(500, f"engine error: {ev.message}", "server_error", ev.kind)
    return ApiError(500, f"unexpected engine reply {type(ev).__name__}", "server_error", None)

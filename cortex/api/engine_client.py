"""The front's side of the engine socket: submit a request, iterate its events, cancel on exit.

Each front thread keeps its own DEALER sockets, so requests of different threads stay apart with
no locking. A socket whose exchange ended cleanly goes back to its thread's idle list for the next
request (a fresh one costs a ZeroMQ handshake, about 0.45 ms, on every request); one left
mid-request (a cancel, a timeout) is closed. Events carry their request id, so a late event of an
earlier request on a reused socket is dropped. Every wait has a timeout: a silent leader becomes a
503, not a hung client.

A leader that dies is noticed at once, not at a timeout: every wait also polls a pidfd of the
leader process (one per front process), which the kernel makes readable the moment the leader
exits, however it dies (SIGKILL and the OOM killer included). The waiting request fails with
``engine_unavailable``; a stream ends with its dialect's error event. Why a pidfd: it costs nothing
per event or per request (one more fd in a poll set that is made anyway), sends no traffic and
gives the leader's loop no work (unlike a heartbeat, whose period would also be the delay), and it
names the process itself, so it says exactly "the leader exited" (unlike a ZeroMQ socket monitor:
one more socket per connection, events to decode, and a disconnect that may be a reconnect). A
leader that hangs without dying is left to the timeouts, as before. The front always runs on the
leader's host: the leader starts it and passes its pid.

A request for a model another leader serves skips the leader while the leader's last answer for that
model name still holds (``routes``: cortex/fleet/routes.py, which says what a copy may miss and for
how long; the proxy drops the copies naming a peer that failed or refused).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import zmq

from cortex.api.errors import ApiError
from cortex.fleet.proxy import ForwardTo
from cortex.fleet.routes import RouteCache
from cortex.ops.reqlog import RequestRecord
from rpc.codec import encode
from rpc.engine import (
    Answer,
    Cancel,
    Delta,
    Embed,
    Failure,
    FailureKind,
    Finished,
    Forward,
    ModelOp,
    PeerFailed,
    Query,
    Started,
    Submit,
    Waiting,
)
from rpc.messages import Error
from rpc.transport import RpcClient

ANSWER_TIMEOUT_S = 10.0
IDLE_PER_THREAD = 2  # a thread serves one request at a time; a second covers query-then-submit


class EngineClient:
    def __init__(
        self, endpoint: str, event_timeout_s: float, load_timeout_s: float = 900.0, leader_pid: int | None = None
    ):
        self.endpoint = endpoint
        self.event_timeout_s, self.load_timeout_s = event_timeout_s, load_timeout_s
        self.leader_pid = leader_pid  # the leader process, when known (the front's settings say)
        self._ctx: zmq.Context | None = None
        self._pid = 0
        self._local = threading.local()
        self._leader_fd: int | None = None
        self._leader_fd_pid = 0
        self._leader_lock = threading.Lock()
        self.routes = RouteCache()  # the leader's Forward answers, while they hold

    def leader_fd(self) -> int | None:
        """A pidfd of the leader, readable once it has exited; opened once per process (gunicorn
        forks its workers). ``GONE`` when the leader had already exited; None when unknown."""
        if not self.leader_pid:
            return None
        if self._leader_fd_pid != os.getpid():
            with self._leader_lock:
                if self._leader_fd_pid != os.getpid():
                    try:
                        self._leader_fd = os.pidfd_open(self.leader_pid)
                    except ProcessLookupError:
                        self._leader_fd = GONE
                    except (OSError, AttributeError):  # no pidfds (an old kernel): the timeouts remain
                        self._leader_fd = None
                    self._leader_fd_pid = os.getpid()
        return self._leader_fd

    def _recv(self, client: RpcClient, timeout_s: float) -> tuple[int, object] | None:
        """``client.recv`` that fails at once (ApiError 503) if the leader dies meanwhile."""
        fd = self.leader_fd()
        if fd is None:
            return client.recv(int(timeout_s * 1000))
        poller = zmq.Poller()
        poller.register(client.socket, zmq.POLLIN)
        if fd != GONE:
            poller.register(fd, zmq.POLLIN)
        deadline = time.monotonic() + timeout_s
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            ready = dict(poller.poll(max(left_ms, 0) if fd != GONE else 0))
            if client.socket in ready:
                return client.recv(0)
            if fd == GONE or fd in ready:
                raise _leader_gone()
            if left_ms <= 0:
                return None

    def _context(self) -> zmq.Context:
        if self._pid != os.getpid():  # gunicorn forks workers: a context must not cross a fork
            self._ctx, self._pid = zmq.Context(), os.getpid()
        return self._ctx

    def _idle(self) -> list[RpcClient]:
        if getattr(self._local, "pid", None) != os.getpid():  # sockets of a parent process: never touched
            self._local.pid, self._local.idle = os.getpid(), []
        return self._local.idle

    def _client(self) -> RpcClient:
        """This thread's idle socket, emptied of anything left in it, or a new one."""
        idle = self._idle()
        if idle:
            client = idle.pop()
            while client.socket.poll(0):
                client.socket.recv_multipart()
            return client
        return RpcClient(self.endpoint, self._context())

    def close(self) -> None:
        """Close every socket and the context (the front keeps its client for the process's life;
        a short-lived client must call this, or the context's finalizer waits for its sockets)."""
        if self._ctx is not None and self._pid == os.getpid():
            self._ctx.destroy(linger=0)
        self._ctx, self._pid = None, 0
        self._local = threading.local()
        with self._leader_lock:
            fd, self._leader_fd = self._leader_fd, None
            if fd is not None and fd != GONE and self._leader_fd_pid == os.getpid():
                os.close(fd)
            self._leader_fd_pid = 0

    def _release(self, client: RpcClient) -> None:
        """Keep a socket whose exchange ended cleanly for this thread's next request."""
        idle = self._idle()
        if len(idle) < IDLE_PER_THREAD and not client.socket.closed:
            idle.append(client)
        else:
            client.close()

    def query(self, what: str) -> dict:
        client, got = self._client(), None
        try:
            client.send(Query(what))
            got = self._recv(client, ANSWER_TIMEOUT_S)
            reply = got[1] if got else None
        finally:
            self._release(client) if got else client.close()
        if not isinstance(reply, Answer):
            raise ApiError(
                503, "the engine is not answering", "service_unavailable", FailureKind.ENGINE_UNAVAILABLE, retry_after=5
            )
        return reply.data

    def report_peer_failure(self, endpoint: str, reason: str) -> None:
        """Tell the leader a forwarded request failed there (fire and forget: no answer comes)."""
        client = RpcClient(self.endpoint, self._context())
        try:
            client.socket.send(encode(PeerFailed(endpoint, reason)), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the leader is gone or busy: the poller will learn it anyway
        finally:
            client.close(linger_ms=200)

    def model_op(self, op: str, model: str, timeout_s: float) -> dict:
        """Load or unload a model; returns its description once done, raises ApiError otherwise."""
        client, got = self._client(), None
        try:
            client.send(ModelOp(op, model))
            got = self._recv(client, timeout_s)
        finally:
            self._release(client) if got else client.close()
        if got is None:
            raise ApiError(504, f"{op} of {model!r} did not finish within {timeout_s:g}s", "server_error", "timeout")
        if isinstance(got[1], Answer):
            return got[1].data
        raise _as_api_error(got[1])

    def count_tokens(self, req: Submit) -> int:
        """The prompt's length in tokens (``req.count_only``); waits for the model's files to load."""
        return int(self.ask(req, req.request_id)["input_tokens"])

    def ask(
        self, msg: Submit | Embed, request_id: str, error: Callable[[object], ApiError] | None = None
    ) -> dict[str, Any]:
        """Send a request the leader answers with one ``Answer`` (a token count, embeddings) and wait
        for it, through ``Waiting`` while its model loads and ``Started`` / ``Delta`` progress while it
        computes (each extends the wait to ``load_timeout_s``: one long input is a single batch).
        Raises ApiError (``error`` words a failure: the caller's own field names), or ForwardTo when
        another leader serves it; a wait that ends early cancels the request."""
        cached = self._cached_route(msg)
        if cached is not None:
            raise ForwardTo(cached)
        epoch = self.routes.epoch()
        client, answered = self._client(), False
        try:
            client.socket.send(_encode(msg))
            timeout_s = ANSWER_TIMEOUT_S
            while True:
                got = self._recv(client, timeout_s)
                if got is None:
                    raise _engine_timeout()
                ev = got[1]
                if getattr(ev, "request_id", request_id) != request_id:
                    continue  # a late event of an earlier request on this socket
                if isinstance(ev, (Waiting, Started, Delta)):
                    timeout_s = self.load_timeout_s
                    continue
                answered = True
                if isinstance(ev, Answer):
                    return ev.data
                if isinstance(ev, Forward):
                    self.routes.learn(msg.model, ev, epoch)
                    raise ForwardTo(ev)
                raise (error or _as_api_error)(ev)
        finally:
            if answered:
                self._release(client)
            else:
                with contextlib.suppress(zmq.ZMQError):  # the leader is gone or busy: nothing more to do
                    client.socket.send(encode(Cancel(request_id)), flags=zmq.NOBLOCK)
                client.close(linger_ms=500)

    def submit(self, req: Submit, record: RequestRecord | None = None) -> Generation:
        """Start ``req``; ``record`` (the request log's, when there is one) follows what happens."""
        cached = self._cached_route(req)
        if cached is not None:
            _record_submitted(record, req)
            raise ForwardTo(cached)
        epoch = self.routes.epoch()
        gen = Generation(
            self._client(), req, self.event_timeout_s, self.load_timeout_s, record, self._release, self.leader_fd()
        )
        try:
            gen.start()
        except ForwardTo as fwd:
            self.routes.learn(req.model, fwd.forward, epoch)
            raise
        return gen

    def _cached_route(self, msg: Submit | Embed) -> Forward | None:
        """The leader's still valid answer for a request naming this model; never for a request a
        peer forwarded (the leader serves those itself or fails them)."""
        return None if msg.hop else self.routes.lookup(msg.model, msg.request_id)


class Generation:
    """Events of one submitted request. Closing it before the end cancels the request."""

    def __init__(
        self,
        client: RpcClient,
        req: Submit,
        event_timeout_s: float,
        load_timeout_s: float,
        record: RequestRecord | None = None,
        release=None,
        leader_fd: int | None = None,
    ):
        self.client, self.req = client, req
        self.leader_fd = leader_fd  # EngineClient.leader_fd: readable once the leader has exited
        self.record = record
        self._release = release or (lambda c: c.close())  # where a cleanly finished socket goes
        self._returned = False
        _record_submitted(record, req)
        self.event_timeout_s, self.load_timeout_s = event_timeout_s, load_timeout_s
        self.prompt_tokens = 0
        self.cached_tokens = 0  # of the prompt, in the prefix cache: known from the first Delta
        self.reasoning = False  # the output starts inside a <think> span
        self.waiting: str | None = None  # why the request has not started yet (a model loading)
        self.done = False
        self._poller: zmq.Poller | None = None  # see _poll_set
        self._poller_watch: socket.socket | None = None

    def _next(self, timeout_s: float, watch: socket.socket | None = None) -> object | None:
        """The next event, or None after ``timeout_s``. With ``watch`` (the client's connection), a
        client that hangs up while we wait raises ClientGone, so its request is cancelled instead
        of generated for nobody. A leader that exits raises ApiError (503) once the events it sent
        before it died are read."""
        ev = self._take()  # an event already here needs no poll: at one stream, one per token
        if ev is not None:
            return ev
        leader, poller = self.leader_fd, self._poll_set(watch)
        deadline = time.monotonic() + timeout_s
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                return None
            ready = dict(poller.poll(0 if leader == GONE else left_ms))
            if self.client.socket in ready:
                ev = self._take()
                if ev is not None:
                    return ev
            elif leader is not None and (leader == GONE or leader in ready):
                raise _leader_gone()
            elif watch is not None and (watch in ready or watch.fileno() in ready):
                if _hung_up(watch):
                    raise ClientGone()
                poller.unregister(watch)  # readable but open: a pipelined request; stop watching
                self._poller = None  # (for this wait: the next one watches again)
                watch = None

    def _take(self) -> object | None:
        """This request's next event if one is waiting (anything else on the socket: a late event
        of an earlier request, dropped)."""
        got = self.client.recv(0)
        if got is not None and getattr(got[1], "request_id", self.req.request_id) == self.req.request_id:
            return got[1]
        return None

    def _poll_set(self, watch: socket.socket | None) -> zmq.Poller:
        """The poller over the events socket, the leader's pidfd and ``watch``; kept for the next
        wait on the same ``watch``, as a stream waits once per token."""
        if self._poller is None or self._poller_watch is not watch:
            poller = zmq.Poller()
            poller.register(self.client.socket, zmq.POLLIN)
            if self.leader_fd is not None and self.leader_fd != GONE:
                poller.register(self.leader_fd, zmq.POLLIN)
            if watch is not None:
                poller.register(watch, zmq.POLLIN)
            self._poller, self._poller_watch = poller, watch
        return self._poller

    def _started(self, ev: object) -> bool:
        if isinstance(ev, Started):
            self.prompt_tokens, self.reasoning, self.waiting = ev.prompt_tokens, ev.reasoning, None
            if self.record is not None:
                self.record.admitted(ev.prompt_tokens)
            return True
        if isinstance(ev, Waiting):
            self.waiting = ev.reason
            return True
        return False

    def start(self) -> None:
        """Send the request; raise ApiError if the leader refuses it. It may still be waiting for
        its model to load (``waiting``) when this returns."""
        try:
            frame = _encode(self.req)
        except ApiError:
            self.done = True
            self._give_back()
            raise
        self.client.socket.send(frame)
        try:
            first = self._next(ANSWER_TIMEOUT_S)
        except ApiError:  # the leader died
            self.close()
            raise
        if first is None:
            self.close()
            raise _engine_timeout()
        if not self._started(first):
            self.done = True
            self._give_back()
            if self.record is not None and isinstance(first, Failure) and first.kind == FailureKind.MODEL_NOT_FOUND:
                self.record.unknown_model()
            if isinstance(first, Forward):  # another leader serves it: the proxy takes over
                raise ForwardTo(first)
            raise _as_api_error(first)

    def events(
        self, watch: socket.socket | None = None, keepalive_s: float | None = None
    ) -> Iterator[Delta | Finished | Started | None]:
        """Yield Delta events and one Finished per choice; raise ApiError on a failure (ClientGone
        if ``watch``, the client's connection, closes first). With ``keepalive_s``, yield None
        whenever that long passes with no event, so a stream can send a ping (a cold load or a long
        prefill must not look like a dead connection to proxies and clients). A Started is
        yielded when a request that waited for its model begins."""
        finished = 0
        try:
            silent_since = time.monotonic()
            while True:
                limit = self.load_timeout_s if self.waiting else self.event_timeout_s
                left = limit - (time.monotonic() - silent_since)
                if left <= 0:
                    raise _engine_timeout()
                ev = self._next(min(left, keepalive_s or left), watch)
                if ev is None:
                    if keepalive_s:
                        yield None
                    continue
                silent_since = time.monotonic()
                if isinstance(ev, Delta):
                    self.cached_tokens = ev.cached_tokens
                    if self.record is not None:
                        self.record.delta(ev.text, ev.index, ev.completion_tokens, ev.cached_tokens)
                    yield ev
                elif isinstance(ev, Finished):
                    if self.record is not None:
                        self.record.finished(
                            ev.prompt_tokens, ev.completion_tokens, ev.cached_tokens, ev.finish_reason, ev.index
                        )
                    finished += 1
                    self.done = finished == self.req.n
                    yield ev
                    if self.done:
                        return
                elif self._started(ev):
                    if isinstance(ev, Started):
                        yield ev
                else:
                    self.done = True
                    raise _as_api_error(ev)
        except ApiError as err:
            if self.record is not None:
                self.record.failed(err.status, err.code)
            raise
        finally:
            self.close()

    def _give_back(self) -> None:
        """The exchange is over: the socket may serve this thread's next request."""
        if not self._returned:
            self._returned = True
            self._release(self.client)

    def close(self) -> None:
        if self._returned or self.client.socket.closed:
            return
        if not self.done:
            with contextlib.suppress(zmq.ZMQError):
                self.client.socket.send(encode(Cancel(self.req.request_id)), flags=zmq.NOBLOCK)
            self.client.close(linger_ms=500)
            return
        self._give_back()


def _record_submitted(record: RequestRecord | None, req: Submit) -> None:
    if record is not None:
        record.submitted(req.request_id, req.model, req.client, req.prompt or req.prompt_ids or req.messages)


def _encode(req: Submit | Embed) -> bytes:
    try:
        return encode(req)
    # e.g. a 100-digit integer in chat_template_kwargs; depth and surrogates are refused earlier
    # (cortex/api/rawbody.py), these are the last line of defence
    except (OverflowError, TypeError, ValueError, RecursionError, UnicodeEncodeError):
        raise ApiError(400, "The request holds a value that cannot be encoded (a number too large?).") from None


def _engine_timeout() -> ApiError:
    return ApiError(503, "the engine did not answer in time", "service_unavailable", "engine_timeout", retry_after=5)


GONE = -1  # EngineClient.leader_fd when the leader had exited before the front looked


def _leader_gone() -> ApiError:
    return ApiError(
        503,
        "the engine stopped: its leader process exited",
        "service_unavailable",
        FailureKind.ENGINE_UNAVAILABLE,
        retry_after=5,
    )


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
        return ApiError.from_failure(ev.kind, ev.message, ev.retry_after, ev.overflow)
    if isinstance(ev, Error):
        return ApiError(500, f"engine error: {ev.message}", "server_error", ev.kind)
    return ApiError(500, f"unexpected engine reply {type(ev).__name__}", "server_error", None)

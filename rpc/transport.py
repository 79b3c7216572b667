"""ZeroMQ transport: a ROUTER that serves, a DEALER that calls. Every call has a timeout.

ROUTER/DEALER rather than REQ/REP: a REQ socket wedges after one lost reply, and the leader needs to
stream many events back to one front request. Ids pair replies with calls; a reply whose id is not the
one awaited is stale (its call timed out) and is dropped, so it can never be mistaken for the next one.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import os
import time
from typing import Any

import zmq

from rpc.codec import DecodeError, decode, encode
from rpc.messages import Error, ErrorKind


class RpcTimeout(TimeoutError):
    pass


class RpcServer:
    """Binds ``endpoint``; receives ``(peer, id, message)`` and replies to a peer.

    An ``ipc://`` socket file is made ``mode`` (0600 unless told otherwise: only this user may
    connect) and removed when the server closes, or when its process exits normally (a worker
    stopped with SIGTERM never calls ``close``)."""

    def __init__(self, endpoint: str, ctx: zmq.Context | None = None, mode: int | None = 0o600):
        self.ctx = ctx or zmq.Context.instance()
        self.socket = self.ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        # No high-water mark: at the default (1000) a ROUTER silently drops messages to a peer that
        # reads slowly, and a streaming client would lose tokens. What one peer can queue is bounded
        # by its request anyway (max_tokens events).
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self._remove_file = None  # removes the socket file this server made (also registered atexit)
        path = endpoint[len("ipc://") :] if endpoint.startswith("ipc://") else None
        if path and os.path.exists(path):
            os.unlink(path)  # left by a process that died; binding over it would fail or mislead
        self.socket.bind(endpoint)
        if path:
            if mode is not None:
                os.chmod(path, mode)  # in the run dir (0700), so nobody else reached it meanwhile
            self._remove_file = functools.partial(_remove_socket_file, path, os.stat(path).st_ino, os.getpid())
            atexit.register(self._remove_file)
        self.endpoint = endpoint

    def recv(self, timeout_ms: int | None = None) -> tuple[bytes, int, Any] | None:
        """Next request, or None on timeout. A malformed frame is answered here with an Error."""
        frames = _recv_frames(self.socket, timeout_ms)
        if frames is None:
            return None
        peer, payload = frames[0], frames[-1]
        try:
            msg_id, msg = decode(payload)
        except DecodeError as exc:
            self.reply(peer, 0, Error(kind=ErrorKind.BAD_FRAME, message=str(exc)))
            return peer, 0, None
        return peer, msg_id, msg

    def reply(self, peer: bytes, msg_id: int, msg: Any) -> None:
        # NOBLOCK: a peer that is gone or not reading must not stall us; it owns its timeout
        with contextlib.suppress(zmq.Again):
            self.socket.send_multipart([peer, encode(msg, msg_id)], flags=zmq.NOBLOCK)

    def close(self) -> None:
        self.socket.close(linger=0)
        if self._remove_file is not None:
            self._remove_file()
            atexit.unregister(self._remove_file)  # this very partial: other servers' hooks stay
            self._remove_file = None


def _recv_frames(socket: zmq.Socket, timeout_ms: int | None) -> list[bytes] | None:
    """The next message's frames; None if none arrives within ``timeout_ms`` (None: wait). With 0
    it is one non-blocking receive, not a poll and a receive: event loops drain their sockets this
    way once per token, and a zmq poll costs several system calls."""
    if timeout_ms == 0:
        try:
            return socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None
    if timeout_ms is not None and not socket.poll(timeout_ms):
        return None
    return socket.recv_multipart()


def _remove_socket_file(path: str, inode: int, pid: int) -> None:
    """Remove the socket file this process bound, never one a successor bound at the same path
    since (another inode), nor from a forked child that inherited the exit hook (another pid)."""
    if os.getpid() != pid:
        return
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == inode:
            os.unlink(path)


class RpcClient:
    """Connects to one server. ``call`` blocks with a timeout; ``send``/``recv`` let an event loop
    keep one or more calls in flight and poll ``socket`` itself."""

    _ids = itertools.count(1)

    def __init__(self, endpoint: str, ctx: zmq.Context | None = None):
        self.ctx = ctx or zmq.Context.instance()
        self.socket = self.ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)  # see RpcServer: never drop a reply
        self.socket.connect(endpoint)
        self.endpoint = endpoint

    def send(self, msg: Any) -> int:
        msg_id = next(self._ids)
        self.socket.send(encode(msg, msg_id))
        return msg_id

    def recv(self, timeout_ms: int | None = None) -> tuple[int, Any] | None:
        """Next reply as ``(id, message)``; None on timeout; an undecodable reply becomes an Error."""
        frames = _recv_frames(self.socket, timeout_ms)
        if frames is None:
            return None
        payload = frames[-1]
        try:
            return decode(payload)
        except DecodeError as exc:
            return 0, Error(kind=ErrorKind.BAD_FRAME, message=str(exc))

    def call(self, msg: Any, timeout_s: float) -> Any:
        """Send ``msg`` and return its reply (an ``Error`` reply is returned, not raised)."""
        msg_id = self.send(msg)
        deadline = time.monotonic() + timeout_s
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            got = self.recv(max(left_ms, 0))
            if got is None:
                raise RpcTimeout(f"{type(msg).__name__} to {self.endpoint}: no reply in {timeout_s:g}s")
            reply_id, reply = got
            if reply_id == msg_id or (reply_id == 0 and isinstance(reply, Error)):
                return reply
            # stale: the reply to a call that already timed out; drop it

    def close(self, linger_ms: int = 0) -> None:
        """``linger_ms``: how long a message still queued (a last Cancel) may take to leave."""
        self.socket.close(linger=linger_ms)

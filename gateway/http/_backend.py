"""The gateway's side of the router: a `Backend` protocol (the seam tests fake) and
`RouterClient`, which talks to a node's router over one DEALER socket per thread.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Generator
from typing import Any, Protocol

import zmq

from actors import (
    TERMINAL_TYPES,
    Answer,
    Cancel,
    ErrorReply,
    Generate,
    Message,
    PeerUnavailable,
    Pending,
    ProtocolError,
    Query,
    decode,
    encode,
    make_socket,
    request_error,
)

EventStream = Generator[Message, None, None]


class Backend(Protocol):
    """What the HTTP app needs from a node. Methods block the calling (request) thread."""

    def stream(self, request: Generate) -> EventStream:
        """`Accepted`, `Started`, `Chunk`s, then `Finished`; raises `RequestError` on failure.

        Closing the generator before `Finished` cancels the request.
        """
        ...

    def query(self, what: str) -> dict[str, Any]:
        """A router snapshot ("models", "health", "status")."""
        ...


class RouterClient:
    """`Backend` over ZeroMQ. Safe to share between threads and across a fork (lazy context)."""

    def __init__(self, endpoint: str, *, idle_timeout_s: float = 15.0) -> None:
        self.endpoint = endpoint
        self.idle_timeout_s = idle_timeout_s
        self._local = threading.local()
        self._ctx: zmq.Context | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def _socket(self) -> zmq.Socket:
        with self._lock:
            if self._pid != os.getpid():  # first use, or first use after gunicorn forked us
                self._ctx = zmq.Context()
                self._pid = os.getpid()
                self._local = threading.local()
        sock: zmq.Socket | None = getattr(self._local, "sock", None)
        if sock is None:
            assert self._ctx is not None
            sock = make_socket(self._ctx, zmq.DEALER)
            sock.connect(self.endpoint)
            self._local.sock = sock
        return sock

    def close(self) -> None:
        """Close every socket and the context; call once no request is running any more."""
        with self._lock:
            if self._ctx is not None and self._pid == os.getpid():
                self._ctx.destroy(linger=0)
            self._ctx = None
            self._pid = -1

    def _receive(self, sock: zmq.Socket, rid: str) -> Message:
        """The next message for `rid`, skipping leftovers of earlier requests on this socket."""
        while True:
            if not sock.poll(int(self.idle_timeout_s * 1000)):
                self._drop_socket()
                raise PeerUnavailable(f"the node's router did not answer within {self.idle_timeout_s:g}s")
            try:
                message = decode(sock.recv())
            except ProtocolError:
                continue
            if getattr(message, "request_id", None) == rid:
                return message

    def _drop_socket(self) -> None:
        sock = getattr(self._local, "sock", None)
        if sock is not None:
            sock.close(linger=0)
            self._local.sock = None

    def stream(self, request: Generate) -> EventStream:
        sock = self._socket()
        rid = request.request_id
        sock.send(encode(request))
        done = False
        try:
            while True:
                message = self._receive(sock, rid)
                if isinstance(message, Pending):
                    continue
                if isinstance(message, ErrorReply):
                    done = True
                    raise request_error(message.code, message.message, message.details)
                done = isinstance(message, TERMINAL_TYPES)
                yield message
                if done:
                    return
        except PeerUnavailable:
            done = True
            raise
        finally:
            if not done:  # the HTTP client went away (generator closed): stop the work
                self._socket().send(encode(Cancel(request_id=rid)))

    def query(self, what: str) -> dict[str, Any]:
        sock = self._socket()
        rid = uuid.uuid4().hex
        sock.send(encode(Query(request_id=rid, what=what)))
        answer = self._receive(sock, rid)
        if not isinstance(answer, Answer):
            raise PeerUnavailable(f"router answered a query with {type(answer).__name__}")
        return answer.data

"""The gateway's side of the router: a `Backend` protocol (the seam tests fake) and
`RouterClient`, which talks to a node's router over one ZeroMQ DEALER per HTTP worker process.

Everything here runs on the HTTP worker's event loop. One reader task takes every frame the
router sends and hands it to the request it belongs to, so thousands of open requests cost one
socket and no threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncGenerator, Iterator
from typing import Any, Protocol, cast

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
    RequestTooLarge,
    decode,
    encode,
    make_socket,
    request_error,
)
from actors._config import MAX_FRAME_BYTES

EventStream = AsyncGenerator[Message, None]


class Backend(Protocol):
    """What the HTTP app needs from a node; coroutines on the worker's event loop."""

    def stream(self, request: Generate) -> EventStream:
        """`Accepted`, `Started`, `Chunk`s, then `Finished`; raises `RequestError` on failure.

        Closing the stream (`aclose()`, or cancelling the task reading it) before `Finished`
        cancels the request.
        """
        ...

    async def query(self, what: str) -> dict[str, Any]:
        """A router snapshot ("models", "health", "status")."""
        ...


class RouterClient:
    """`Backend` over ZeroMQ: one DEALER socket per process and event loop (made on first use, so
    after gunicorn forked the worker), read by a callback on its file descriptor.

    A plain socket and `loop.add_reader` rather than `zmq.asyncio`: each wake-up drains every
    waiting frame without a future per frame, which halves the worker's CPU per streamed token."""

    def __init__(
        self, endpoint: str, *, idle_timeout_s: float = 15.0, max_frame_bytes: int = MAX_FRAME_BYTES
    ) -> None:
        self.endpoint = endpoint
        self.idle_timeout_s = idle_timeout_s
        self.max_frame_bytes = max_frame_bytes
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._owner: tuple[int, asyncio.AbstractEventLoop] | None = None
        self._inboxes: dict[str, asyncio.Queue[Message]] = {}

    def _socket(self) -> zmq.Socket:
        loop = asyncio.get_running_loop()
        owner = (os.getpid(), loop)
        if self._owner != owner:  # first use, or a new process or loop
            if self._owner is not None and self._owner[0] == owner[0]:
                self._close()  # a loop that ended (tests): its socket goes with it
            self._ctx = zmq.Context()
            sock = self._sock = make_socket(self._ctx, zmq.DEALER)
            sock.connect(self.endpoint)
            self._inboxes = {}
            loop.add_reader(_fd(sock), self._drain)
            self._owner = owner
        assert self._sock is not None
        return self._sock

    def _drain(self) -> None:
        """The socket's FD is readable (edge-triggered): hand every waiting frame to the request
        it belongs to, dropping the rest, until none is left."""
        sock = self._sock
        while sock is not None and cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            frame = sock.recv(zmq.NOBLOCK)
            try:
                message = decode(frame, self.max_frame_bytes)
            except ProtocolError:
                continue
            inbox = self._inboxes.get(getattr(message, "request_id", ""))
            if inbox is not None:
                inbox.put_nowait(message)

    def _close(self) -> None:
        if self._sock is not None and self._owner is not None and not self._owner[1].is_closed():
            self._owner[1].remove_reader(_fd(self._sock))
        if self._sock is not None:
            self._sock.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()
        self._ctx = self._sock = self._owner = None

    async def close(self) -> None:
        """Close the socket; call once no request is running any more."""
        self._close()

    async def _send(self, message: Message) -> None:
        frame = encode(message)
        if len(frame) > self.max_frame_bytes:
            raise RequestTooLarge(
                f"The request is {len(frame)} bytes once encoded, over the node's limit of "
                f"{self.max_frame_bytes} bytes."
            )
        async with asyncio.timeout(self.idle_timeout_s):
            while not self._send_now(frame):  # 10,000 frames queued to a router that reads none
                await asyncio.sleep(0.01)

    def _send_now(self, frame: bytes) -> bool:
        """Send without blocking; False if the socket's queue is full."""
        try:
            self._socket().send(frame, zmq.NOBLOCK)
        except zmq.Again:
            return False
        self._drain()  # sending may have consumed the FD's edge for frames already waiting
        return True

    @contextlib.contextmanager
    def _inbox(self, rid: str) -> Iterator[asyncio.Queue[Message]]:
        """A queue that receives every frame about `rid` while the block runs."""
        self._socket()  # first: a new socket starts with no inboxes
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._inboxes[rid] = inbox
        try:
            yield inbox
        finally:
            self._inboxes.pop(rid, None)

    async def _receive(self, inbox: asyncio.Queue[Message]) -> Message:
        if not inbox.empty():  # already here: no timer to arm (the common case mid-stream)
            return inbox.get_nowait()
        # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a cancellation that lands
        # as the item arrives, and a client's disconnect would then not cancel its request.
        try:
            async with asyncio.timeout(self.idle_timeout_s):
                return await inbox.get()
        except TimeoutError:
            raise PeerUnavailable(
                f"the node's router did not answer within {self.idle_timeout_s:g}s"
            ) from None

    async def stream(self, request: Generate) -> EventStream:
        rid = request.request_id
        done = False
        with self._inbox(rid) as inbox:
            try:
                await self._send(request)
                while True:
                    message = await self._receive(inbox)
                    if isinstance(message, Pending):
                        continue
                    if isinstance(message, ErrorReply):
                        done = True
                        raise request_error(message.code, message.message, message.details)
                    done = isinstance(message, TERMINAL_TYPES)
                    yield message
                    if done:
                        return
            except (PeerUnavailable, RequestTooLarge):
                done = True
                raise
            finally:
                if not done and self._sock is not None:  # the client went away: stop the work
                    try:
                        self._send_now(encode(Cancel(request_id=rid)))
                    except zmq.ZMQError:
                        pass  # the router is gone too: it has nothing to cancel

    async def query(self, what: str) -> dict[str, Any]:
        rid = uuid.uuid4().hex
        with self._inbox(rid) as inbox:
            await self._send(Query(request_id=rid, what=what))
            answer = await self._receive(inbox)
        if not isinstance(answer, Answer):
            raise PeerUnavailable(f"router answered a query with {type(answer).__name__}")
        return answer.data


def _fd(sock: zmq.Socket) -> int:
    """The socket's (edge-triggered) file descriptor, for the event loop to watch."""
    return cast(int, sock.getsockopt(zmq.FD))

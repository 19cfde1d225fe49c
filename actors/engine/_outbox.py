"""What an engine child says to its worker, with a request's chunks merged per stream interval.

Every frame an engine sends costs CPU in each process it crosses on its way to the client (the
worker, the router, the HTTP worker): on a machine whose cores all decode, that CPU comes out of
decoding. So a request's first chunk goes at once (the time to first token is not delayed), and
later chunks are held and merged until `interval_s` has passed since the request's last frame:
a few tokens to a frame, each token late by at most the interval. Any other event about the
request (its end, an error) first sends what is held, so order is kept and nothing is lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import zmq

from actors.wire._codec import Message, encode
from actors.wire._messages import TERMINAL_TYPES, Chunk


class Outbox:
    """Sends engine events on `sock` (the child's pipe to its worker); not thread-safe."""

    def __init__(
        self, sock: zmq.Socket, interval_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._sock = sock
        self.interval_s = interval_s
        self._clock = clock
        self._last_sent: dict[str, float] = {}  # request id -> when its last chunk went
        self._held: dict[str, Chunk] = {}  # request id -> the chunks not sent yet, merged

    def put(self, event: Message) -> None:
        """Send `event`, or hold it if it is a chunk due later (and send what is due by now)."""
        rid: str = getattr(event, "request_id", "")
        if isinstance(event, Chunk):
            held = self._held.pop(rid, None)
            chunk = event if held is None else _merge(held, event)
            now = self._clock()
            if now - self._last_sent.get(rid, -1e18) >= self.interval_s:
                self._last_sent[rid] = now
                self._sock.send(encode(chunk))
            else:
                self._held[rid] = chunk
            return
        held = self._held.pop(rid, None)
        if held is not None:
            self._sock.send(encode(held))
        if isinstance(event, TERMINAL_TYPES):
            self._last_sent.pop(rid, None)
        self._sock.send(encode(event))

    def flush_due(self) -> None:
        """Send the held chunks whose interval has passed (before a step that may take long)."""
        if not self._held:
            return
        now = self._clock()
        for rid in [r for r in self._held if now - self._last_sent[r] >= self.interval_s]:
            self._last_sent[rid] = now
            self._sock.send(encode(self._held.pop(rid)))

    @property
    def holding(self) -> int:
        """Requests with chunks held (tests)."""
        return len(self._held)


def _merge(a: Chunk, b: Chunk) -> Chunk:
    return Chunk(
        request_id=a.request_id,
        text=a.text + b.text,
        n_tokens=a.n_tokens + b.n_tokens,
        tokens=a.tokens + b.tokens,
        logprobs=a.logprobs + b.logprobs,
    )

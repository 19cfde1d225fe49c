"""Talking to a node from outside its actors: one request, one answer, with a deadline."""

from __future__ import annotations

import uuid
from typing import Any

import zmq

from actors._errors import PeerUnavailable, ProtocolError
from actors.wire._codec import decode, encode
from actors.wire._messages import Answer, Query
from actors.wire._sockets import make_socket


def ask(
    ctx: zmq.Context, endpoint: str, what: str, *, timeout_s: float, args: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Send `Query(what, args)` to `endpoint` and return the answer's data; blocks up to `timeout_s`.

    Raises `PeerUnavailable` when nothing (or nothing valid) answers in time.
    """
    sock = make_socket(ctx, zmq.DEALER)
    try:
        sock.connect(endpoint)
        rid = uuid.uuid4().hex
        sock.send(encode(Query(request_id=rid, what=what, args=args or {})))
        if not sock.poll(int(timeout_s * 1000)):
            raise PeerUnavailable(f"no answer from {endpoint} within {timeout_s:g}s")
        try:
            answer = decode(sock.recv())
        except ProtocolError as err:
            raise PeerUnavailable(f"{endpoint} answered with a bad frame: {err}") from err
        if not isinstance(answer, Answer) or answer.request_id != rid:
            raise PeerUnavailable(f"{endpoint} answered out of turn")
        return answer.data
    finally:
        sock.close(linger=0)

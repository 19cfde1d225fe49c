"""Talking to a node from outside its actors: one request, one answer, with a deadline."""

from __future__ import annotations

import uuid
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from actors._errors import PeerUnavailable, ProtocolError
from actors.wire._codec import decode, encode
from actors.wire._curve import HANDSHAKE_FAILURES, ClientKeys, describe_failure, set_client_keys
from actors.wire._messages import Answer, Query
from actors.wire._sockets import make_socket


class Refused(PeerUnavailable):
    """The node refused our connection's handshake (it is secured, and our key is not welcome,
    or we came without one)."""


def ask(
    ctx: zmq.Context,
    endpoint: str,
    what: str,
    *,
    timeout_s: float,
    args: dict[str, Any] | None = None,
    keys: ClientKeys | None = None,
) -> dict[str, Any]:
    """Send `Query(what, args)` to `endpoint` (as a CURVE client with `keys`) and return the
    answer's data; blocks up to `timeout_s`.

    Raises `Refused` when the node refuses the handshake, `PeerUnavailable` when nothing (or
    nothing valid) answers in time.
    """
    sock = make_socket(ctx, zmq.DEALER)
    monitor = sock.get_monitor_socket(HANDSHAKE_FAILURES)
    try:
        if keys is not None:
            set_client_keys(sock, keys.public, keys.secret, keys.server)
        sock.connect(endpoint)
        rid = uuid.uuid4().hex
        sock.send(encode(Query(request_id=rid, what=what, args=args or {})))
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        events = dict(poller.poll(int(timeout_s * 1000)))
        if monitor in events and sock not in events:
            why = describe_failure(dict(parse_monitor_message(monitor.recv_multipart())))
            raise Refused(f"{endpoint} refused the connection: {why}")
        if sock not in events:
            raise PeerUnavailable(f"no answer from {endpoint} within {timeout_s:g}s")
        try:
            answer = decode(sock.recv())
        except ProtocolError as err:
            raise PeerUnavailable(f"{endpoint} answered with a bad frame: {err}") from err
        if not isinstance(answer, Answer) or answer.request_id != rid:
            raise PeerUnavailable(f"{endpoint} answered out of turn")
        return answer.data
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)

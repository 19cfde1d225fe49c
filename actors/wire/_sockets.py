"""The one place sockets are made, so that socket options (and later CURVE/ZAP) apply to all."""

from __future__ import annotations

import zmq

# Queues are bounded so that a stuck peer costs memory we chose, not all of it.
_HWM = 10_000
_KEEPALIVE_IDLE_S = 30  # TCP keepalive so a vanished host's connection is noticed


def make_socket(ctx: zmq.Context, kind: int, *, identity: bytes | None = None) -> zmq.Socket:
    """A new socket of `kind` with the node's standard options; the caller's thread owns it."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, _HWM)
    sock.setsockopt(zmq.RCVHWM, _HWM)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, _KEEPALIVE_IDLE_S)
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    if kind == zmq.ROUTER:
        # Raise EHOSTUNREACH instead of silently dropping a message to a vanished peer.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    return sock

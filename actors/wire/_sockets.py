"""The one place sockets are made, so that socket options (and later CURVE/ZAP) apply to all.

Every TCP connection carries ZMTP heartbeats: a peer that stops answering (a partition, a host
that vanished) is noticed in `_HEARTBEAT_TIMEOUT_MS`, the connection is dropped and ZeroMQ
reconnects every `_RECONNECT_MAX_MS` at most, each attempt bounded by `_CONNECT_TIMEOUT_MS` —
so a healed link carries traffic again within about two seconds instead of waiting out TCP's
retransmission back-off.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import zmq

# Queues are bounded so that a stuck peer costs memory we chose, not all of it.
_HWM = 10_000
_KEEPALIVE_IDLE_S = 30  # TCP keepalive so a vanished host's connection is noticed
_HEARTBEAT_IVL_MS = 1000  # ZMTP PING this often on an idle connection
_HEARTBEAT_TIMEOUT_MS = 3000  # no traffic for this long after a PING: the connection is dead
_RECONNECT_IVL_MS = 100  # first reconnect attempt after a connection is lost
_RECONNECT_MAX_MS = 1000  # attempts back off to at most this interval
_CONNECT_TIMEOUT_MS = 1000  # a connect that does not complete in this long is retried


_used = threading.local()  # the sockets this thread used since its actor loop last looked


def watch_use(used: set[zmq.Socket] | None) -> None:
    """From now on, note in `used` the sockets this thread sends on or connects (None: stop).
    An actor's loop asks them whether they are readable before it sleeps: the operation may have
    processed the command that made one readable, and then its `ZMQ_FD` stays quiet
    (`actors.runtime._poll`)."""
    _used.socks = used


class Socket(zmq.Socket):
    """A ZeroMQ socket that notes its sends, connects and binds (see `watch_use`)."""

    def send(self, *args: Any, **kwargs: Any) -> Any:
        self._note_use()
        return super().send(*args, **kwargs)

    def connect(self, *args: Any, **kwargs: Any) -> Any:
        self._note_use()
        return super().connect(*args, **kwargs)

    def bind(self, *args: Any, **kwargs: Any) -> Any:
        self._note_use()
        return super().bind(*args, **kwargs)

    def _note_use(self) -> None:
        used = getattr(_used, "socks", None)
        if used is not None:
            used.add(self)


def make_socket(ctx: zmq.Context, kind: int, *, identity: bytes | None = None) -> zmq.Socket:
    """A new socket of `kind` with the node's standard options; the caller's thread owns it."""
    sock = ctx.socket(kind, socket_class=Socket)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, _HWM)
    sock.setsockopt(zmq.RCVHWM, _HWM)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, _KEEPALIVE_IDLE_S)
    sock.setsockopt(zmq.HEARTBEAT_IVL, _HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, _HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_MAX_MS)
    sock.setsockopt(zmq.CONNECT_TIMEOUT, _CONNECT_TIMEOUT_MS)
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    if kind == zmq.ROUTER:
        # Raise EHOSTUNREACH instead of silently dropping a message to a vanished peer.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    return sock


def private_ipc(name: str) -> str:
    """An `ipc://` endpoint for `name` in a directory only this user can enter (for pipes between
    a node's own processes: its gateway, its engine children). Named after this process, so that
    the pipes of processes that died without closing them (a `kill -9`) are swept here."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"mesh-llm-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    if base.stat().st_uid != os.getuid():
        raise PermissionError(f"{base} belongs to another user")
    os.chmod(base, 0o700)
    _sweep(base)
    return f"ipc://{base}/{os.getpid()}-{name}"


def _sweep(base: Path) -> None:
    """Remove pipes left by processes that are gone."""
    for entry in base.iterdir():
        pid = entry.name.split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            entry.unlink(missing_ok=True)


def remove_ipc(endpoint: str | None) -> None:
    """Remove the file of an `ipc://` endpoint we bound (ZeroMQ leaves it behind); idempotent."""
    if endpoint is not None and endpoint.startswith("ipc://"):
        Path(endpoint[len("ipc://") :]).unlink(missing_ok=True)

"""The RPC tunnel: llama.cpp's RPC byte streams carried over the mesh's own ZeroMQ links.

The head's engine connects to a loopback port of its node (a ZeroMQ STREAM socket: raw TCP); each
TCP connection becomes a numbered stream on the head's DEALER link to the stage node's tunnel
port; there a STREAM socket per connection reaches the stage's RPC server, which listens on
loopback only. So llama.cpp's unauthenticated RPC server is never on the LAN, and the security
of the ZeroMQ links covers the RPC plane too.

Tunnel frames are three ZeroMQ frames, `[b"T", header, data]`, the header packing the lease
epoch (the stage fences off every other), the connection number and what happens to it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from actors.runtime._actor import Actor

TAG = b"T"
OPEN, DATA, CLOSE = 0, 1, 2
_HEADER = struct.Struct("!QIB")  # epoch, connection, op


def unbounded(sock: zmq.Socket) -> zmq.Socket:
    """No high-water mark: a tunnel must never drop a byte of a stream (llama.cpp's RPC is
    request/response, so what is in flight is bounded by one command's payload)."""
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    return sock


def tunnel_frames(epoch: int, conn: int, op: int, data: bytes = b"") -> list[bytes]:
    return [TAG, _HEADER.pack(epoch, conn, op), data]


def parse_tunnel(frames: list[bytes]) -> tuple[int, int, int, bytes] | None:
    """(epoch, conn, op, data) of a tunnel frame, or None if the frames are not one."""
    if len(frames) != 3 or frames[0] != TAG or len(frames[1]) != _HEADER.size:
        return None
    epoch, conn, op = _HEADER.unpack(frames[1])
    if op not in (OPEN, DATA, CLOSE) or (op != DATA and frames[2]):
        return None
    return epoch, conn, op, frames[2]


class HeadEnd:
    """The head's end of the tunnel to one stage: a loopback port for the engine, relayed over
    `send` (the head's link to the stage node). Counts the bytes each way."""

    def __init__(self, actor: Actor, epoch: int, send: Callable[[list[bytes]], object]) -> None:
        self.actor = actor
        self.epoch = epoch
        self._send = send
        self.stream = unbounded(actor.socket(zmq.STREAM))
        self.port = self.stream.bind_to_random_port("tcp://127.0.0.1")
        actor.on_socket(self.stream, self._from_engine)
        self._by_zid: dict[bytes, int] = {}
        self._by_conn: dict[int, bytes] = {}
        self._next = 1
        self.bytes_up = self.bytes_down = 0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _from_engine(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return
        zid, data = frames
        conn = self._by_zid.get(zid)
        if conn is None:
            if data:
                return  # bytes of a connection we already closed
            conn = self._next
            self._next += 1
            self._by_zid[zid], self._by_conn[conn] = conn, zid
            self._send(tunnel_frames(self.epoch, conn, OPEN))
        elif not data:  # the engine closed it
            self._forget(conn)
            self._send(tunnel_frames(self.epoch, conn, CLOSE))
        else:
            self.bytes_up += len(data)
            self._send(tunnel_frames(self.epoch, conn, DATA, data))

    def from_stage(self, conn: int, op: int, data: bytes) -> None:
        zid = self._by_conn.get(conn)
        if zid is None:
            return
        if op == DATA:
            self.bytes_down += len(data)
            self.stream.send_multipart([zid, data])
        elif op == CLOSE:
            self._forget(conn)
            self.stream.send_multipart([zid, b""])

    def close_all(self) -> None:
        """Close every engine connection (the stage is gone: the engine must not wait for it)."""
        for conn, zid in list(self._by_conn.items()):
            self._forget(conn)
            try:
                self.stream.send_multipart([zid, b""], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def close(self) -> None:
        self.close_all()
        self.actor.forget(self.stream)

    def _forget(self, conn: int) -> None:
        zid = self._by_conn.pop(conn, None)
        if zid is not None:
            self._by_zid.pop(zid, None)


@dataclass(slots=True)
class _Conn:
    sock: zmq.Socket
    connected: bool = False
    pending: list[bytes] = field(default_factory=list)


class StageEnd:
    """The stage's end: one STREAM connection to the local RPC server per tunnelled connection."""

    def __init__(
        self, actor: Actor, rpc_endpoint: str, send: Callable[[list[bytes]], None], *, max_connections: int
    ) -> None:
        self.actor = actor
        self.rpc_endpoint = rpc_endpoint
        self._send = send
        self.max_connections = max_connections
        self._conns: dict[int, _Conn] = {}

    def from_head(self, epoch: int, conn: int, op: int, data: bytes) -> None:
        if op == OPEN:
            if conn in self._conns or len(self._conns) >= self.max_connections:
                self.actor.stats["tunnel_refused"] += 1
                self._send(tunnel_frames(epoch, conn, CLOSE))
                return
            sock = unbounded(self.actor.socket(zmq.STREAM))
            sock.setsockopt(zmq.RECONNECT_IVL, -1)  # a reconnect would be a new RPC client
            sock.setsockopt(zmq.CONNECT_ROUTING_ID, b"rpc")
            sock.connect(f"tcp://{self.rpc_endpoint}")
            self._conns[conn] = _Conn(sock)
            self.actor.on_socket(sock, lambda frames: self._from_server(epoch, conn, frames))
        elif (c := self._conns.get(conn)) is None:
            return
        elif op == DATA:
            if c.connected:
                c.sock.send_multipart([b"rpc", data])
            else:
                c.pending.append(data)
        else:
            self._close(conn)

    def _from_server(self, epoch: int, conn: int, frames: list[bytes]) -> None:
        c = self._conns.get(conn)
        if c is None or len(frames) != 2:
            return
        data = frames[1]
        if data:
            self._send(tunnel_frames(epoch, conn, DATA, data))
        elif not c.connected:
            c.connected = True
            for chunk in c.pending:
                c.sock.send_multipart([b"rpc", chunk])
            c.pending.clear()
        else:  # the server closed it
            self._close(conn)
            self._send(tunnel_frames(epoch, conn, CLOSE))

    def _close(self, conn: int) -> None:
        c = self._conns.pop(conn, None)
        if c is not None:
            self.actor.forget(c.sock)

    def close(self) -> None:
        for conn in list(self._conns):
            self._close(conn)

    def __len__(self) -> int:
        return len(self._conns)

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
MAX_CHUNK_BYTES = 256 * 1024  # bytes coalesced into one message at most (well under frame limits)
MAX_PENDING_BYTES = 16 * 1024 * 1024  # bytes a stage holds for an RPC connection still connecting
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
        self.round_trips = 0  # answers that followed a request: the engine waited for each
        self.messages_up = self.messages_down = 0
        self._waiting = False

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _from_engine(self, frames: list[bytes]) -> None:
        """What the engine wrote, and whatever more it has written since: the RPC client writes a
        token's commands in a burst, and one message per burst costs far less than one each."""
        pending: tuple[int, list[bytes]] | None = None  # a connection's bytes not yet sent
        while True:
            if len(frames) == 2:
                zid, data = frames
                conn = self._by_zid.get(zid)
                if data and conn is not None and pending is not None and pending[0] == conn:
                    pending[1].append(data)
                    if sum(map(len, pending[1])) >= MAX_CHUNK_BYTES:
                        self._flush(pending)
                        pending = None
                else:
                    self._flush(pending)
                    pending = self._event(zid, conn, data)
            try:
                frames = self.stream.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
        self._flush(pending)

    def _event(self, zid: bytes, conn: int | None, data: bytes) -> tuple[int, list[bytes]] | None:
        """Handle a connect or disconnect; the start of a connection's bytes to send."""
        if conn is None:
            if data:
                return None  # bytes of a connection we already closed
            conn = self._next
            self._next += 1
            self._by_zid[zid], self._by_conn[conn] = conn, zid
            self._send(tunnel_frames(self.epoch, conn, OPEN))
            return None
        if not data:  # the engine closed it
            self._forget(conn)
            self._send(tunnel_frames(self.epoch, conn, CLOSE))
            return None
        return conn, [data]

    def _flush(self, pending: tuple[int, list[bytes]] | None) -> None:
        if pending is None:
            return
        conn, chunks = pending
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.bytes_up += len(data)
        self.messages_up += 1
        self._waiting = True
        self._send(tunnel_frames(self.epoch, conn, DATA, data))

    def from_stage(self, conn: int, op: int, data: bytes) -> None:
        zid = self._by_conn.get(conn)
        if zid is None:
            return
        if op == DATA:
            self.bytes_down += len(data)
            self.messages_down += 1
            if self._waiting:
                self.round_trips += 1
                self._waiting = False
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
    pending_bytes: int = 0


class StageEnd:
    """The stage's end: one STREAM connection to the local RPC server per tunnelled connection."""

    def __init__(
        self,
        actor: Actor,
        rpc_endpoint: str,
        send: Callable[[list[bytes]], None],
        *,
        max_connections: int,
        server_up: bool = True,
    ) -> None:
        """`server_up`: the RPC server listens already; if not, connections the head opens wait
        (their bytes held) until `serve()` says it does, so that the head's engine can start
        while the server does."""
        self.actor = actor
        self.rpc_endpoint = rpc_endpoint
        self._send = send
        self.max_connections = max_connections
        self.server_up = server_up
        self._conns: dict[int, _Conn] = {}

    def from_head(self, epoch: int, conn: int, op: int, data: bytes) -> None:
        if op == OPEN:
            if conn in self._conns or len(self._conns) >= self.max_connections:
                self.actor.stats["tunnel_refused"] += 1
                self._send(tunnel_frames(epoch, conn, CLOSE))
                return
            sock = unbounded(self.actor.socket(zmq.STREAM))
            # A reconnect would be a new RPC client: we close the socket as soon as the server hangs
            # up, long before this. (Not -1: with reconnects off, ZeroMQ never says it hung up.)
            sock.setsockopt(zmq.RECONNECT_IVL, 60_000)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 0)
            sock.setsockopt(zmq.CONNECT_ROUTING_ID, b"rpc")
            if self.server_up:
                sock.connect(f"tcp://{self.rpc_endpoint}")
            self._conns[conn] = _Conn(sock)
            self.actor.on_socket(sock, lambda frames: self._from_server(epoch, conn, frames))
        elif (c := self._conns.get(conn)) is None:
            return
        elif op == DATA:
            if c.connected:
                c.sock.send_multipart([b"rpc", data])
            elif c.pending_bytes + len(data) > MAX_PENDING_BYTES:  # the server never answered
                self.actor.stats["tunnel_overflows"] += 1
                self._close(conn)
                self._send(tunnel_frames(epoch, conn, CLOSE))
            else:
                c.pending.append(data)
                c.pending_bytes += len(data)
        else:  # the head closed it: after the bytes queued for the server
            c.sock.send_multipart([b"rpc", b""])
            self._close(conn, linger_ms=1000)

    def serve(self) -> None:
        """The RPC server listens now: connect the connections that waited for it."""
        if not self.server_up:
            self.server_up = True
            for c in self._conns.values():
                c.sock.connect(f"tcp://{self.rpc_endpoint}")

    def _from_server(self, epoch: int, conn: int, frames: list[bytes]) -> None:
        c = self._conns.get(conn)
        if c is None or len(frames) != 2:
            return
        data = frames[1]
        if data:  # and whatever more the server has written since, in one message
            chunks = [data]
            while True:
                try:
                    more = c.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(more) != 2 or not more[1]:  # a disconnect: after these bytes
                    self._send(tunnel_frames(epoch, conn, DATA, b"".join(chunks)))
                    self._from_server(epoch, conn, more)
                    return
                chunks.append(more[1])
                if sum(map(len, chunks)) >= MAX_CHUNK_BYTES:
                    break
            self._send(tunnel_frames(epoch, conn, DATA, chunks[0] if len(chunks) == 1 else b"".join(chunks)))
        elif not c.connected:
            c.connected = True
            for chunk in c.pending:
                c.sock.send_multipart([b"rpc", chunk])
            c.pending.clear()
        else:  # the server closed it
            self._close(conn)
            self._send(tunnel_frames(epoch, conn, CLOSE))

    def _close(self, conn: int, linger_ms: int = 0) -> None:
        c = self._conns.pop(conn, None)
        if c is not None:
            self.actor.forget(c.sock, linger_ms=linger_ms)

    def close(self) -> None:
        for conn in list(self._conns):
            self._close(conn)

    def __len__(self) -> int:
        return len(self._conns)

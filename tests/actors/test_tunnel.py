"""The RPC tunnel's two ends, joined by an inproc pair, in front of a real TCP server."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
import zmq

from actors import Actor, NodeConfig
from actors.splits._tunnel import CLOSE, DATA, OPEN, HeadEnd, StageEnd, parse_tunnel, tunnel_frames


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


class EchoServer:
    """Answers each request (4-byte length + payload) with the payload reversed; a request of
    length 0 makes it close the connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    n = int.from_bytes(_recv_exactly(conn, 4), "little")
                    if n == 0:
                        return
                    payload = _recv_exactly(conn, n)
                except ConnectionError:
                    return
                conn.sendall(len(payload).to_bytes(4, "little") + payload[::-1])


class Tunnel(Actor):
    """A head end and a stage end in one actor, as two nodes would run them."""

    def __init__(self, ctx: zmq.Context, server_port: int, **kw: object) -> None:
        super().__init__(ctx, "tunnel", config=NodeConfig())
        self.server_port = server_port
        self.kw = kw
        self.closing = threading.Event()
        self.tick_interval_s = 0.01

    def setup(self) -> None:
        a, b = self.socket(zmq.PAIR), self.socket(zmq.PAIR)
        a.bind(f"inproc://tunnel-{id(self)}")
        b.connect(f"inproc://tunnel-{id(self)}")
        self.head = HeadEnd(self, 7, a.send_multipart)
        self.stage = StageEnd(self, f"127.0.0.1:{self.server_port}", b.send_multipart, max_connections=4)
        self.on_socket(a, self._to_head)
        self.on_socket(b, self._to_stage)

    def close_all_soon(self) -> None:
        """Have the actor's thread close the head's connections (its sockets are its own: a
        send from this thread while it sends would abort inside libzmq)."""
        self.closing.set()

    def on_tick(self, now: float) -> None:
        if self.closing.is_set():
            self.closing.clear()
            self.head.close_all()

    def _to_head(self, frames: list[bytes]) -> None:
        parsed = parse_tunnel(frames)
        assert parsed is not None
        self.head.from_stage(*parsed[1:])

    def _to_stage(self, frames: list[bytes]) -> None:
        parsed = parse_tunnel(frames)
        assert parsed is not None
        self.stage.from_head(*parsed)


@pytest.fixture
def tunnel(zmq_ctx: zmq.Context) -> Iterator[Tunnel]:
    server = EchoServer()
    with Tunnel(zmq_ctx, server.port) as t:
        yield t
    server.sock.close()


def ask(conn: socket.socket, payload: bytes) -> bytes:
    conn.sendall(len(payload).to_bytes(4, "little") + payload)
    n = int.from_bytes(_recv_exactly(conn, 4), "little")
    return _recv_exactly(conn, n)


def test_byte_streams_cross_intact_over_several_connections(tunnel: Tunnel) -> None:
    conns = [socket.create_connection(("127.0.0.1", tunnel.head.port), timeout=10) for _ in range(3)]
    try:
        for i in range(60):
            conn = conns[i % 3]
            payload = bytes(range(256)) * (1 + (i * 997) % 5000)  # up to 1.3 MB: split and coalesced
            assert ask(conn, payload) == payload[::-1]
    finally:
        for conn in conns:
            conn.close()
    assert tunnel.head.messages_up < 60 * 40  # bursts cross as few messages, not one per read


def test_a_connection_the_server_closes_is_closed_for_the_engine(tunnel: Tunnel) -> None:
    conn = socket.create_connection(("127.0.0.1", tunnel.head.port), timeout=10)
    assert ask(conn, b"abc") == b"cba"
    conn.sendall((0).to_bytes(4, "little"))  # the server hangs up
    assert conn.recv(10) == b""  # EOF reaches the engine, never a hang
    conn.close()


def test_closing_all_connections_gives_the_engine_eof_at_once(tunnel: Tunnel) -> None:
    """A stage that died: the head closes what its engine has open (llama.cpp then aborts,
    instead of waiting forever)."""
    conn = socket.create_connection(("127.0.0.1", tunnel.head.port), timeout=10)
    assert ask(conn, b"xy") == b"yx"
    tunnel.close_all_soon()
    assert conn.recv(10) == b""
    conn.close()


@pytest.mark.parametrize(
    "frames",
    [
        [b"T", b"short", b""],
        [b"X", tunnel_frames(1, 1, DATA, b"x")[1], b"x"],
        [b"T", tunnel_frames(1, 1, DATA)[1]],
        [b"T", tunnel_frames(1, 1, OPEN)[1], b"bytes on an open"],
        [b"T", tunnel_frames(1, 1, CLOSE)[1][:-1] + b"\x09", b""],
    ],
)
def test_malformed_tunnel_frames_are_refused(frames: list[bytes]) -> None:
    assert parse_tunnel(frames) is None


def test_a_stage_refuses_connections_past_its_limit(tunnel: Tunnel) -> None:
    conns = []
    try:
        for _ in range(4):  # the stage's limit
            conns.append(socket.create_connection(("127.0.0.1", tunnel.head.port), timeout=10))
            assert ask(conns[-1], b"ok") == b"ko"
        extra = socket.create_connection(("127.0.0.1", tunnel.head.port), timeout=10)
        conns.append(extra)
        assert extra.recv(10) == b""  # refused: closed at once
        assert tunnel.stats["tunnel_refused"] == 1
        assert ask(conns[0], b"still") == b"llits"
    finally:
        for conn in conns:
            conn.close()

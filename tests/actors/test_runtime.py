"""The actor runtime: handshake, bad input, clean and idempotent stop."""

from __future__ import annotations

import threading

import pytest
import zmq

from actors import Actor, ActorStartError, Chunk, decode, encode, make_socket
from actors.runtime._supervisor import Backoff
from tests.support.nodes import eventually


class Echo(Actor):
    """Binds a ROUTER and echoes every decodable message back; fails on `boom` text."""

    def __init__(self, zmq_ctx: zmq.Context, endpoint: str) -> None:
        super().__init__(zmq_ctx, "echo")
        self.endpoint = endpoint
        self.stopped_with: list[str] = []

    def setup(self) -> None:
        self.sock = self.socket(zmq.ROUTER)
        self.sock.bind(self.endpoint)
        self.on_socket(self.sock, self.handle)

    def handle(self, frames: list[bytes]) -> None:
        message = self.decode(frames[-1], "test")
        if isinstance(message, Chunk) and message.text == "boom":
            raise RuntimeError("handler bug")
        if message is not None:
            self.sock.send_multipart([frames[0], encode(message)])

    def teardown(self) -> None:
        self.stopped_with.append(threading.current_thread().name)


def client(zmq_ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = make_socket(zmq_ctx, zmq.DEALER)
    sock.connect(endpoint)
    return sock


def test_an_actor_starts_answers_and_stops_in_its_own_thread(zmq_ctx: zmq.Context) -> None:
    with Echo(zmq_ctx, "inproc://echo-1") as actor:
        assert actor.running
        sock = client(zmq_ctx, "inproc://echo-1")
        sock.send(encode(Chunk(request_id="r", text="hi", n_tokens=1)))
        assert sock.poll(2000)
        assert decode(sock.recv()).text == "hi"
        sock.close()
    assert not actor.running
    assert actor.stopped_with == ["actor-echo"]


def test_a_bind_error_in_setup_is_raised_to_the_caller_of_start(zmq_ctx: zmq.Context) -> None:
    with Echo(zmq_ctx, "inproc://echo-dup"):
        second = Echo(zmq_ctx, "inproc://echo-dup")
        with pytest.raises(ActorStartError, match="echo"):
            second.start()
        assert not second.running


def test_garbage_frames_are_dropped_and_counted_and_the_actor_keeps_serving(zmq_ctx: zmq.Context) -> None:
    with Echo(zmq_ctx, "inproc://echo-2") as actor:
        sock = client(zmq_ctx, "inproc://echo-2")
        for junk in (b"", b"\xc1\xc1", b"x" * 100, b"\x93\x01\xa5chunk\x80"):
            sock.send(junk)
        sock.send(encode(Chunk(request_id="r", text="boom", n_tokens=1)))
        sock.send(encode(Chunk(request_id="r", text="still here", n_tokens=1)))
        assert sock.poll(2000)
        assert decode(sock.recv()).text == "still here"
        assert actor.stats["dropped_frames"] == 4
        assert actor.stats["handler_errors"] == 1
        sock.close()


def test_stop_is_idempotent(zmq_ctx: zmq.Context) -> None:
    actor = Echo(zmq_ctx, "inproc://echo-3").start()
    actor.stop()
    actor.stop()
    assert actor.stopped_with == ["actor-echo"]


def test_restart_backoff_doubles_up_to_its_cap_and_resets() -> None:
    backoff = Backoff(0.5, 2.0)
    assert [backoff.next_delay() for _ in range(4)] == [0.5, 1.0, 2.0, 2.0]
    backoff.reset()
    assert backoff.next_delay() == 0.5


class Ticker(Echo):
    """Counts its ticks; idle until it has echoed something, then busy for good."""

    idle_tick_s = 1.0

    def __init__(self, zmq_ctx: zmq.Context, endpoint: str) -> None:
        super().__init__(zmq_ctx, endpoint)
        self.ticks: list[float] = []
        self.busy = False

    def handle(self, frames: list[bytes]) -> None:
        self.busy = True
        super().handle(frames)

    def idle(self) -> bool:
        return not self.busy

    def on_tick(self, now: float) -> None:
        self.ticks.append(now)


def test_an_idle_actor_ticks_rarely_and_work_brings_the_fast_ticks_at_once(zmq_ctx: zmq.Context) -> None:
    import time

    with Ticker(zmq_ctx, "inproc://ticker") as actor:
        time.sleep(1.5)
        idle_ticks = len(actor.ticks)
        assert 1 <= idle_ticks <= 3  # about one a second, not fifteen
        sock = client(zmq_ctx, "inproc://ticker")
        sock.send(encode(Chunk(request_id="r", text="hi", n_tokens=1)))
        assert sock.poll(2000)
        sock.recv()
        # every 0.1 s now, without waiting out the idle second (idle, 0.95 s would hold one tick)
        eventually(lambda: len(actor.ticks) - idle_ticks >= 3, timeout_s=0.95)
        sock.close()

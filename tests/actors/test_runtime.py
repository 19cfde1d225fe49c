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


# -- guests: actors that run on another actor's thread -----------------------------------------


class Guest(Echo):
    """An echo that runs as a guest of `host`, and counts its ticks."""

    def __init__(self, zmq_ctx: zmq.Context, endpoint: str, host: Actor) -> None:
        Actor.__init__(self, zmq_ctx, "guest", host=host)
        self.endpoint = endpoint
        self.stopped_with: list[str] = []
        self.ticks = 0

    def on_tick(self, now: float) -> None:
        self.ticks += 1


def ask_echo(sock: zmq.Socket, text: str) -> str | None:
    sock.send(encode(Chunk(request_id="r", text=text, n_tokens=1)))
    if not sock.poll(2000):
        return None
    return decode(sock.recv()).text  # type: ignore[no-any-return]


def test_a_guest_runs_its_handlers_and_ticks_on_its_hosts_thread_and_stops_alone(
    zmq_ctx: zmq.Context,
) -> None:
    with Echo(zmq_ctx, "inproc://host-1") as host:
        guest = Guest(zmq_ctx, "inproc://guest-1", host).start()
        assert guest.running
        to_host, to_guest = client(zmq_ctx, "inproc://host-1"), client(zmq_ctx, "inproc://guest-1")
        assert ask_echo(to_guest, "to the guest") == "to the guest"
        assert ask_echo(to_host, "to the host") == "to the host"
        eventually(lambda: guest.ticks >= 3, timeout_s=2.0)  # its own timers, every 0.1 s
        to_guest.send(encode(Chunk(request_id="r", text="boom", n_tokens=1)))
        eventually(lambda: guest.stats["handler_errors"] == 1)
        assert host.stats["handler_errors"] == 0  # counted where it happened
        guest.stop()
        guest.stop()  # idempotent
        assert not guest.running
        assert guest.stopped_with == ["actor-echo"]  # torn down on the host's thread
        assert ask_echo(to_host, "still here") == "still here"  # the host runs on
        to_host.close()
        to_guest.close()
    assert host.stopped_with == ["actor-echo"]


def test_a_host_stops_its_guests_and_a_guests_setup_error_reaches_its_starter(zmq_ctx: zmq.Context) -> None:
    host = Echo(zmq_ctx, "inproc://host-2").start()
    with pytest.raises(ActorStartError, match="guest"):
        Guest(zmq_ctx, "inproc://host-2", host).start()  # the address is the host's: bind fails
    guest = Guest(zmq_ctx, "inproc://guest-2", host).start()
    to_guest = client(zmq_ctx, "inproc://guest-2")
    assert ask_echo(to_guest, "hi") == "hi"
    host.stop()
    assert not guest.running
    assert guest.stopped_with == ["actor-echo"]
    guest.stop()  # after its host: nothing left to do, and no wait
    to_guest.close()
    with pytest.raises(ActorStartError, match="not running"):
        Guest(zmq_ctx, "inproc://guest-3", host).start()


def test_a_burst_longer_than_one_drain_is_handled_to_the_last_message(zmq_ctx: zmq.Context) -> None:
    """A drain takes at most 256 messages from a socket; the rest must not wait for another."""
    with Echo(zmq_ctx, "inproc://burst") as _actor:
        sock = client(zmq_ctx, "inproc://burst")
        for i in range(1000):
            sock.send(encode(Chunk(request_id="r", text=str(i), n_tokens=1)))
        got = []
        while len(got) < 1000 and sock.poll(2000):
            got.append(decode(sock.recv()).text)
        assert got == [str(i) for i in range(1000)]
        sock.close()


def test_a_socket_whose_send_took_its_wake_up_is_still_seen_readable(zmq_ctx: zmq.Context) -> None:
    """A send may process the command that made a socket readable, and its fd then stays quiet:
    the poller must ask that socket before it sleeps, or the message waits for ever."""
    import time

    from actors.runtime._poll import Readiness

    mine, peer = make_socket(zmq_ctx, zmq.PAIR), make_socket(zmq_ctx, zmq.PAIR)
    mine.bind("inproc://readiness")
    peer.connect("inproc://readiness")
    readiness = Readiness()
    try:
        readiness.register(mine)
        assert readiness.poll(0) == set()
        peer.send(b"for mine")
        time.sleep(0.05)  # past ZeroMQ's 1 ms throttle: the send below processes mine's commands
        mine.send(b"for peer")
        started = time.monotonic()
        assert readiness.poll(2000) == {mine}
        assert time.monotonic() - started < 1.0
        assert mine.recv() == b"for mine"
    finally:
        readiness.close()
        mine.close()
        peer.close()


class Starter(Echo):
    """Tries to start a guest of its own from its handler (its own thread)."""

    def handle(self, frames: list[bytes]) -> None:
        try:
            Guest(self.ctx, "inproc://never", self).start()
        except ActorStartError as err:
            self.stopped_with.append(str(err))


def test_a_guest_started_from_its_hosts_own_thread_is_refused_at_once(zmq_ctx: zmq.Context) -> None:
    with Starter(zmq_ctx, "inproc://starter") as host:
        sock = client(zmq_ctx, "inproc://starter")
        sock.send(encode(Chunk(request_id="r", text="go", n_tokens=1)))
        eventually(lambda: len(host.stopped_with) == 1, timeout_s=2.0)  # not after a start timeout
        assert "would wait for itself" in host.stopped_with[0]
        sock.close()

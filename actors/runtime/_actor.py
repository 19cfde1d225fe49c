"""The actor runtime: a thread per actor, owning its sockets, driven by a poll loop.

An actor is started with a handshake over an inproc PAIR pipe (a setup error is raised to the
caller of `start()`), runs handlers for whatever its sockets receive, and stops when its pipe says
so: `teardown()` then fails every request the actor still holds, and its sockets are closed by the
thread that owns them.

An actor made with `host=` runs on its host's thread instead, as a guest of the host's loop: its
sockets are polled, its handlers and ticks run there, and it starts and stops on its own pipe as any
actor does (the host stops its guests when it stops). Messages between the two still go over their
sockets, but handing one on wakes no other thread (the shard-worker, the router's guest, relays
every chunk of every stream). The loop waits with `Readiness`, whose wake-up costs one system call,
not two per socket.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from actors._config import NodeConfig
from actors._errors import ActorStartError, ProtocolError
from actors.runtime._poll import Readiness
from actors.wire._codec import Message, decode
from actors.wire._curve import (
    HANDSHAKE_FAILURES,
    INVITE_USER,
    Keyring,
    NotAMember,
    describe_failure,
    dial,
    listen,
)
from actors.wire._sockets import make_socket

log = logging.getLogger(__name__)

_READY, _FAILED, _STOP, _STOPPED = b"READY", b"FAILED", b"STOP", b"STOPPED"
_MAX_BATCH = 256  # messages taken from one socket per wake-up, so no socket starves the others
_pipe_ids = itertools.count()

SocketHandler = Callable[[list[bytes]], None]
FdHandler = Callable[[], None]


class Actor:
    """Base class. Subclasses bind in `setup()`, react in handlers, clean up in `teardown()`."""

    tick_interval_s: float = 0.1  # how often `on_tick` runs at the least
    # While `idle()` says nothing is in hand, `on_tick` runs only this often (None: always at
    # `tick_interval_s`). Asked again after every message handled, so work that arrives gets the
    # fast ticks at once.
    idle_tick_s: float | None = None

    def __init__(
        self,
        ctx: zmq.Context,
        name: str,
        *,
        config: NodeConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        host: Actor | None = None,
    ) -> None:
        """`host`: run on that actor's thread (started first) rather than a thread of its own."""
        self.name = name
        self.ctx = ctx
        self.config = config or NodeConfig()
        self.clock = clock
        self.stats: Counter[str] = Counter()
        self._endpoint = f"inproc://actor-pipe-{name}-{next(_pipe_ids)}"
        self._pipe: zmq.Socket | None = None
        self._thread: threading.Thread | None = None
        self._start_error: BaseException | None = None
        self._host = host
        self._hosted = False  # a guest between its setup and its teardown
        # What the loop polls, with the actor each belongs to: used in the loop's actor (the host's
        # for a guest), which is the only thread that touches them.
        self._sockets: dict[zmq.Socket, tuple[Actor, SocketHandler]] = {}
        self._fds: dict[int, tuple[Actor, FdHandler]] = {}
        self._owned: list[zmq.Socket] = []
        self._poller: Readiness = (
            host._poller if host is not None else Readiness()
        )  # a guest shares its host's
        self._last_tick = -math.inf
        # A host's guests: arriving (put by their starters' threads), and running (their pipes).
        self._arrivals: queue.SimpleQueue[Actor] = queue.SimpleQueue()
        self._doorbell = f"inproc://actor-doorbell-{name}-{next(_pipe_ids)}"
        self._guests: dict[zmq.Socket, Actor] = {}
        self._leaving: list[zmq.Socket] = []  # pipes of guests torn down, to answer next round
        self._warned: set[str] = set()
        # Sockets bound on a secured context: their messages are checked against the keyring
        # (a member revoked since it connected is dropped), and their handshake failures logged.
        self._secured: dict[zmq.Socket, tuple[Keyring, str]] = {}
        self._zap_monitors: dict[zmq.Socket, zmq.Socket] = {}
        # Who sent the message being handled: the member's node id (or an invite's User-Id) on a
        # secured socket, None on any other.
        self.sender: str | None = None

    # -- called by the owner (another thread) -------------------------------------------------

    def start(self) -> Actor:
        """Start the thread and block until `setup()` finished; raises `ActorStartError`."""
        if self._thread is not None:
            return self
        host = self._host
        if host is not None and not host.running:
            raise ActorStartError(f"actor {self.name}: its host {host.name} is not running")
        if host is not None and threading.current_thread() is host._thread:
            raise ActorStartError(
                f"actor {self.name}: started on its host's thread, which would wait for itself"
            )
        pipe = make_socket(self.ctx, zmq.PAIR)
        pipe.bind(self._endpoint)
        self._pipe = pipe
        if host is None:
            thread = threading.Thread(target=self._run, name=f"actor-{self.name}", daemon=True)
            self._thread = thread
            thread.start()
        else:
            self._thread = host._thread
            host._invite(self)
        if not pipe.poll(int(self.config.actor_start_timeout_s * 1000)):
            self.stop()
            raise ActorStartError(f"actor {self.name} did not start in time")
        if pipe.recv() != _READY:
            if host is None:
                thread.join()
            self._thread = None
            pipe.close()
            self._pipe = None
            raise ActorStartError(f"actor {self.name}: {self._start_error}") from self._start_error
        return self

    def stop(self) -> None:
        """Stop the actor and join its thread; safe to call twice or on an actor that died."""
        pipe, thread = self._pipe, self._thread
        if pipe is None or thread is None:
            return
        if self._host is not None and threading.current_thread() is thread:
            raise RuntimeError(
                f"actor {self.name}: stopped on its host's thread, which would wait for itself"
            )
        self._pipe = None
        if thread.is_alive():
            try:
                pipe.send(_STOP, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            if pipe.poll(int(self.config.actor_stop_timeout_s * 1000)):
                pipe.recv()
            elif self._host is not None:
                log.error("actor %s did not stop within %.1fs", self.name, self.config.actor_stop_timeout_s)
        pipe.close()
        if self._host is not None:  # the thread is the host's, and runs on
            return
        thread.join(self.config.actor_stop_timeout_s)
        if thread.is_alive():
            log.error("actor %s did not stop within %.1fs", self.name, self.config.actor_stop_timeout_s)

    @property
    def running(self) -> bool:
        alive = self._thread is not None and self._thread.is_alive()
        return alive and (self._host is None or self._hosted)

    def __enter__(self) -> Actor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- for subclasses (run on the actor's thread) -------------------------------------------

    def setup(self) -> None:
        """Make and bind sockets (with `socket()`), register handlers. Errors fail `start()`."""

    def teardown(self) -> None:
        """Fail whatever the actor still holds; sockets are closed after this returns."""

    def on_tick(self, now: float) -> None:
        """Timers: called at least every `tick_interval_s` while the actor runs (every
        `idle_tick_s` while it is idle)."""

    def idle(self) -> bool:
        """Nothing in hand that needs the fast ticks (see `idle_tick_s`)."""
        return False

    def socket(self, kind: int, *, identity: bytes | None = None) -> zmq.Socket:
        """A socket owned by this actor, closed when it stops."""
        sock = make_socket(self.ctx, kind, identity=identity)
        self._owned.append(sock)
        return sock

    def dial(self, kind: int, endpoint: str, node_id: str | None) -> zmq.Socket | None:
        """A socket owned by this actor, connected to node `node_id` at `endpoint` through the
        socket factory (CURVE, pinned to that member's key, on a secured node); None when a
        secured node does not know it as a member (a warning, once)."""
        sock = self.socket(kind)
        try:
            dial(sock, endpoint, node_id)
        except NotAMember as err:
            self.forget(sock)
            self.warn_once(f"not-member:{endpoint}", "%s: not connecting to %s: %s", self.name, endpoint, err)
            return None
        return sock

    def listen(self, sock: zmq.Socket, endpoint: str, plane: str) -> None:
        """Bind `sock` on a network `plane` (control, router, gossip, tunnel) through the socket
        factory: on a secured node only members get through, and every refusal is logged."""
        keyring = listen(sock, endpoint, plane)
        if keyring is None:
            return
        self._secured[sock] = (keyring, plane)
        monitor = self.adopt(sock.get_monitor_socket(HANDSHAKE_FAILURES))
        self._zap_monitors[sock] = monitor
        self.on_socket(monitor, lambda frames: self._handshake_failed(plane, endpoint, frames))

    def _handshake_failed(self, plane: str, endpoint: str, frames: list[bytes]) -> None:
        try:
            event = parse_monitor_message(frames)
        except (ValueError, IndexError, struct.error):
            return
        self.stats["refused_connections"] += 1
        self.warn_once(
            f"handshake:{plane}:{event.get('event')}",
            "%s: refused a connection to the %s port (%s): %s",
            self.name,
            plane,
            endpoint,
            describe_failure(dict(event)),
        )

    def adopt(self, sock: zmq.Socket) -> zmq.Socket:
        """Own a socket made elsewhere (a pyzmq monitor socket): closed when the actor stops."""
        self._owned.append(sock)
        return sock

    @property
    def _loop_actor(self) -> Actor:
        """The actor whose thread runs this one's loop: its host's, or its own."""
        return self._host or self

    def on_socket(self, sock: zmq.Socket, handler: SocketHandler) -> None:
        """Call `handler(frames)` for every multipart message `sock` receives."""
        loop = self._loop_actor
        loop._sockets[sock] = (self, handler)
        loop._poller.register(sock)

    def on_fd(self, fd: int, handler: FdHandler) -> None:
        """Call `handler()` whenever `fd` is readable (e.g. a child's pidfd)."""
        loop = self._loop_actor
        loop._fds[fd] = (self, handler)
        loop._poller.register(fd)

    def forget(self, sock_or_fd: zmq.Socket | int, *, linger_ms: int = 0) -> None:
        """Stop polling a socket or fd; a socket is also closed (what it has queued is dropped,
        or delivered for up to `linger_ms` in the background)."""
        loop = self._loop_actor
        if sock_or_fd in loop._sockets or sock_or_fd in loop._fds:
            loop._poller.unregister(sock_or_fd)
        if isinstance(sock_or_fd, int):
            loop._fds.pop(sock_or_fd, None)
            return
        loop._sockets.pop(sock_or_fd, None)
        self._secured.pop(sock_or_fd, None)
        monitor = self._zap_monitors.pop(sock_or_fd, None)
        if monitor is not None:
            sock_or_fd.disable_monitor()
            self.forget(monitor)
        if sock_or_fd in self._owned:
            self._owned.remove(sock_or_fd)
        sock_or_fd.close(linger=linger_ms)

    def decode(self, frame: bytes, source: str) -> Message | None:
        """Decode an untrusted frame; a bad one is counted, logged once, and gives None."""
        try:
            return decode(frame, self.config.max_frame_bytes)
        except ProtocolError as err:
            self.stats["dropped_frames"] += 1
            self.warn_once(f"drop:{source}", "%s dropped a bad frame from %s: %s", self.name, source, err)
            return None

    def warn_once(self, key: str, fmt: str, *args: object) -> None:
        """Log at WARNING the first time `key` happens, at DEBUG after that. At most
        `max_warn_keys` keys are remembered (keys can come from the network)."""
        fresh = key not in self._warned and len(self._warned) < self.config.max_warn_keys
        if fresh:
            self._warned.add(key)
        log.log(logging.WARNING if fresh else logging.DEBUG, fmt, *args)

    # -- the loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        pipe = make_socket(self.ctx, zmq.PAIR)
        pipe.connect(self._endpoint)
        doorbell = self.socket(zmq.PULL)  # rung when a guest arrives (see `_invite`)
        doorbell.bind(self._doorbell)
        if not self._set_up(pipe):
            self._poller.close()
            return
        self._poller.register(pipe)
        self.on_socket(doorbell, lambda _frames: self._welcome_arrivals())
        try:
            self._loop(pipe)
        except Exception:
            log.exception("actor %s crashed", self.name)
        finally:
            for guest_pipe in reversed(list(self._guests)):
                self._dismiss(guest_pipe)
            self._say_stopped()
            self._tear_down()
            self._poller.close()
            pipe.send(_STOPPED)
            pipe.close()
            while not self._arrivals.empty():  # guests that came too late: their start() times out
                self._arrivals.get_nowait()

    def _loop(self, pipe: zmq.Socket) -> None:
        while True:
            leaving, self._leaving = self._leaving, []
            actors = [self, *self._guests.values()]
            due = [actor._next_tick() for actor in actors]
            soonest = min((t for t in due if t is not None), default=None)
            # Rounded up: rounded down, the last millisecond before each tick was a busy loop of
            # zero-timeout polls (~1 ms of CPU per tick per actor).
            timeout_ms = None if soonest is None else math.ceil(max(0.0, soonest - self.clock()) * 1000)
            if leaving:
                timeout_ms = 0
            events = self._poller.poll(timeout_ms)
            if pipe in events:
                self._leaving[:0] = leaving  # answered as the host stops
                return
            for guest_pipe in list(self._guests):
                if guest_pipe in events:
                    self._dismiss(guest_pipe)
            for sock, (actor, handler) in list(self._sockets.items()):
                if sock in events:
                    actor._drain(sock, handler)
            for fd, (actor, fd_handler) in list(self._fds.items()):
                if fd in events:
                    actor._guard(fd_handler)
            for actor, next_tick in zip(actors, due, strict=True):
                now = actor.clock()
                if next_tick is not None and now >= next_tick and (actor is self or actor._hosted):
                    actor._guard(lambda actor=actor, now=now: actor.on_tick(now))  # type: ignore[misc]
                    actor._last_tick = now
            self._say_stopped(leaving)

    def _next_tick(self) -> float | None:
        """When `on_tick` is due next (None: this actor has no timers, and sleeps until a message)."""
        if type(self).on_tick is Actor.on_tick:
            return None
        slow = self.idle_tick_s is not None and self._guarded_idle()
        return self._last_tick + (self.idle_tick_s if slow and self.idle_tick_s else self.tick_interval_s)

    # -- guests (on the host's thread, but `_invite`) ------------------------------------------

    def _invite(self, guest: Actor) -> None:
        """Have this actor's thread set `guest` up (called by whoever starts the guest; the guest
        answers on its own pipe)."""
        self._arrivals.put(guest)
        bell = make_socket(self.ctx, zmq.PUSH)
        bell.connect(self._doorbell)
        bell.send(b"", zmq.NOBLOCK)
        bell.close(linger=int(self.config.actor_start_timeout_s * 1000))

    def _welcome_arrivals(self) -> None:
        while not self._arrivals.empty():
            guest = self._arrivals.get_nowait()
            pipe = make_socket(self.ctx, zmq.PAIR)
            pipe.connect(guest._endpoint)
            guest._hosted = True  # before READY: its starter may ask `running` at once
            if not guest._set_up(pipe):
                guest._hosted = False
                continue
            self._guests[pipe] = guest
            self._poller.register(pipe)

    def _dismiss(self, pipe: zmq.Socket) -> None:
        """Stop a guest: its pipe said so, or the host stops. Its starter hears that it stopped
        after one more round of the loop, in which the host handles what the guest said last (a
        retired worker's news reaches the router before `stop()` returns)."""
        guest = self._guests.pop(pipe)
        self._poller.unregister(pipe)
        guest._tear_down()
        guest._hosted = False
        self._leaving.append(pipe)

    def _set_up(self, pipe: zmq.Socket) -> bool:
        """Run `setup()` on the loop's thread and answer the starter on `pipe`: READY, or FAILED
        (the error kept for `start()` to raise, the pipe closed, whatever setup made closed)."""
        try:
            self.setup()
        except BaseException as err:
            self._start_error = err
            self._close_all()
            pipe.send(_FAILED)
            pipe.close()
            return False
        pipe.send(_READY)
        return True

    def _tear_down(self) -> None:
        """`teardown()` (an error logged), then close what the actor owns."""
        try:
            self.teardown()
        except Exception:
            log.exception("actor %s failed in teardown", self.name)
        self._close_all()

    def _say_stopped(self, pipes: list[zmq.Socket] | None = None) -> None:
        """Answer the pipes of guests torn down (all of them: None)."""
        if pipes is None:
            pipes, self._leaving = self._leaving, []
        for pipe in pipes:
            pipe.send(_STOPPED)
            pipe.close()

    def _guarded_idle(self) -> bool:
        try:
            return self.idle()
        except Exception:
            log.exception("actor %s failed to say whether it is idle", self.name)
            return False

    def _drain(self, sock: zmq.Socket, handler: SocketHandler) -> None:
        """Handle what `sock` holds until it would block (its fd only fires again then), or at
        most `_MAX_BATCH` messages, and then it is asked again before the loop sleeps."""
        secured = self._secured.get(sock)
        loop = self._loop_actor
        try:
            for _ in range(_MAX_BATCH):
                if sock not in loop._sockets:  # a handler forgot this socket
                    return
                try:
                    if secured is None:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    else:
                        frames = self._recv_checked(sock, *secured)
                except zmq.Again:
                    return
                if frames:
                    self._guard(lambda frames=frames: handler(frames))  # type: ignore[misc]
            loop._poller.unfinished(sock)
        finally:
            self.sender = None

    def _recv_checked(self, sock: zmq.Socket, keyring: Keyring, plane: str) -> list[bytes]:
        """A message from a secured socket, or [] when its sender is no longer welcome."""
        parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        user = str(parts[-1].get("User-Id") or "") or None
        if not keyring.admits(user) and not (user or "").startswith(INVITE_USER):
            self.stats["refused_frames"] += 1
            self.warn_once(
                f"revoked:{plane}:{user}",
                "%s: dropped a message from %s: no longer a member",
                self.name,
                user,
            )
            return []
        self.sender = user
        return [p.bytes for p in parts]

    def _guard(self, call: Callable[[], None]) -> None:
        try:
            call()
        except Exception:
            self.stats["handler_errors"] += 1
            log.exception("actor %s: handler failed", self.name)

    def _close_all(self) -> None:
        loop = self._loop_actor  # a guest's watches are the host's to drop
        mine: list[zmq.Socket | int] = [s for s, (actor, _) in loop._sockets.items() if actor is self]
        mine += [fd for fd, (actor, _) in loop._fds.items() if actor is self]
        for sock_or_fd in mine:
            loop._poller.unregister(sock_or_fd)
            if isinstance(sock_or_fd, int):
                del loop._fds[sock_or_fd]
            else:
                del loop._sockets[sock_or_fd]
        for sock in self._owned:
            sock.close()  # LINGER is 0 unless the actor set one to flush a last message
        self._owned.clear()

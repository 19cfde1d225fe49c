"""Waiting on an actor's sockets at the cost of the ones that have something, not of them all.

`zmq.Poller` (libzmq's `zmq_poll`) asks every socket for its `ZMQ_EVENTS` before it sleeps and
again when it wakes, and each ask is a system call (and a `getpid`): strace counted 20 `poll`
calls per wake-up of the router's thread (a dozen sockets), 7626 system calls over 5 streamed
requests, and 2219 with this. Here each socket's `ZMQ_FD` sits in one epoll set, so a wake-up
costs one system call and the sockets that fired.

`ZMQ_FD` is not readability: it says that the socket has commands to process, and any operation
on the socket (a send, a receive, a connect, asking for `ZMQ_EVENTS`) may process them and leave
it readable with the fd quiet. So a socket is asked for its events before the loop sleeps when
its fd fired, when it was registered, when this thread sent on it or connected it (a socket
from `make_socket` says so: `watch_use`), or when the last drain stopped before it was empty; and
the loop drains a socket until it would block.
"""

from __future__ import annotations

import select

import zmq

from actors.wire._sockets import watch_use


class Readiness:
    """The readable ones of a set of ZeroMQ sockets and plain fds; used by one thread."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._items: dict[int, zmq.Socket | int] = {}  # fd -> the socket (by its ZMQ_FD) or the fd
        self._fd_of: dict[zmq.Socket, int] = {}
        self._suspects: set[zmq.Socket] = set()
        self._used: set[zmq.Socket] = set()

    def register(self, item: zmq.Socket | int) -> None:
        fd = item if isinstance(item, int) else _zmq_fd(item)
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except FileExistsError:  # the number of an fd closed unforgotten, whose file lives on
            self._epoll.modify(fd, select.EPOLLIN)
        self._items[fd] = item
        if not isinstance(item, int):
            self._fd_of[item] = fd
            self._suspects.add(item)

    def unregister(self, item: zmq.Socket | int) -> None:
        """Stop watching `item`; it may be closed already (a child's pidfd closed before it was
        forgotten: the kernel dropped it from the set, and its number may be another's now)."""
        if isinstance(item, int):
            fd = item
            if not isinstance(self._items.get(fd), int):
                return
        else:
            self._suspects.discard(item)
            self._used.discard(item)
            known = self._fd_of.pop(item, None)
            if known is None or self._items.get(known) is not item:
                return
            fd = known
        del self._items[fd]
        try:
            self._epoll.unregister(fd)
        except OSError:  # closed already
            pass

    def unfinished(self, sock: zmq.Socket) -> None:
        """A drain stopped before `sock` would block: ask it again before sleeping."""
        self._suspects.add(sock)

    def poll(self, timeout_ms: int | None) -> set[zmq.Socket | int]:
        """The items readable now, waiting up to `timeout_ms` (None: for ever) for one."""
        suspects = self._suspects | (self._used & self._fd_of.keys())
        self._suspects, self._used = set(), set()
        watch_use(self._used)  # what the handlers after this wait use is noted there
        ready: set[zmq.Socket | int] = {sock for sock in suspects if _readable(sock)}
        wait = 0 if ready else (-1 if timeout_ms is None else timeout_ms / 1000)
        for fd, _mask in self._epoll.poll(wait):
            item = self._items.get(fd)
            if isinstance(item, int) or (item is not None and item not in ready and _readable(item)):
                ready.add(item)
        return ready

    def close(self) -> None:
        watch_use(None)
        self._epoll.close()


def _zmq_fd(sock: zmq.Socket) -> int:
    return int(sock.getsockopt(zmq.FD))


def _readable(sock: zmq.Socket) -> bool:
    """Whether `sock` holds a message (asking processes its pending commands, and clears its fd)."""
    return bool(int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)

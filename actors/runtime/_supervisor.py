"""Supervision of child processes: start, notice death at once (pidfd), kill, back off."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
from collections.abc import Sequence

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


class ChildProcess:
    """One supervised child. `exit_fd` becomes readable the moment the child exits."""

    def __init__(
        self, argv: Sequence[str], *, env: dict[str, str] | None = None, group: bool = False
    ) -> None:
        """`group`: the child leads a process group of its own, and `kill()` kills the whole group
        at once (a server and the workers it forked, which hold its listening socket)."""
        self.argv = list(argv)
        self.env = env
        self.group = group
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None

    def start(self) -> int:
        """Start the child; returns its pid. Its stdout/stderr go to ours."""
        self.close()
        self._proc = subprocess.Popen(
            self.argv, env=self.env, stdin=subprocess.DEVNULL, process_group=0 if self.group else None
        )
        self._pidfd = os.pidfd_open(self._proc.pid)
        return self._proc.pid

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def exit_fd(self) -> int:
        if self._pidfd is None:
            raise RuntimeError("child not started")
        return self._pidfd

    def exit_code(self) -> int | None:
        """The exit code once the child has exited (reaping it), else None."""
        return self._proc.poll() if self._proc is not None else None

    def kill(self) -> None:
        """SIGKILL the child (if it still runs) and reap it."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            if self.group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def close(self) -> None:
        """Kill and reap the child, release the pidfd; idempotent."""
        self.kill()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        self._proc = None


class Backoff:
    """Restart delays that double after each failure, up to a cap; `reset()` after a success."""

    def __init__(self, first_s: float, max_s: float) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self._next_s = first_s

    def next_delay(self) -> float:
        delay = self._next_s
        self._next_s = min(self._next_s * 2, self.max_s)
        return delay

    def reset(self) -> None:
        self._next_s = self.first_s


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL us when our parent dies (and exit if it already did)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass  # not Linux: the worker still kills us on a clean stop
    if os.getppid() != parent_pid:
        os._exit(0)

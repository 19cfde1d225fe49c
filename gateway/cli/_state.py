"""A node's state directory: its id, kept across restarts, and a lock so that two running nodes
never share one.

Without `--state-dir`, each `--zmq-port` gets a directory of its own under
`$XDG_STATE_HOME/mesh-llm` (`node-9338/`, ...), so several nodes started on one machine are
distinct nodes with no extra flags, and each keeps its id across restarts.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import socket
from pathlib import Path
from typing import IO

from discovery._trust import NODE_ID

log = logging.getLogger(__name__)


class StateDirError(Exception):
    """The state directory cannot be used (in use by another node, or not writable)."""


def default_state_dir(zmq_port: int) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local/state")
    return Path(base) / "mesh-llm" / f"node-{zmq_port}"


class StateDir:
    """An open, locked state directory. `close()` releases the lock (also at process exit)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.mkdir(parents=True, exist_ok=True)
            self._lock: IO[str] | None = (path / "lock").open("a+")
        except OSError as err:
            raise StateDirError(f"cannot use the state directory {path}: {err}") from err
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            raise StateDirError(
                f"the state directory {path} is in use by a running node (pid {holder}); "
                "give each node on this machine its own --state-dir (or its own --zmq-port)"
            ) from err
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(str(os.getpid()))
        self._lock.flush()

    def node_id(self) -> str:
        """The id kept here; a missing, empty or garbled id file (a full disk) gets a new one."""
        path = self.path / "node_id"
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            text = None
        except OSError as err:
            raise StateDirError(f"cannot read {path}: {err}") from err
        if text is not None and NODE_ID.fullmatch(text):
            return text
        if text is not None:
            log.warning("the node id file %s held %r, not an id: making a new id", path, text[:40])
        return self.renew_node_id()

    def renew_node_id(self) -> str:
        """Make, write (atomically) and return a new id."""
        node_id = f"{socket.gethostname()}-{secrets.token_hex(3)}"
        path = self.path / "node_id"
        tmp = path.with_name(f".node_id.{os.getpid()}.tmp")
        try:
            with tmp.open("w") as f:
                f.write(node_id + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise StateDirError(f"cannot write the node id to {path}: {err}") from err
        return node_id

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

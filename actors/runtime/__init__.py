"""The generic actor runtime, free of anything LLM: `Actor` (a thread, its sockets, a poll loop,
a start/stop handshake), `ChildProcess` supervision (pidfd, kill, back-off), and `ask()` (one
query, one answer, with a deadline) for callers outside a node."""

from typing import TYPE_CHECKING

from actors._lazy import lazy_names
from actors.runtime._supervisor import Backoff, ChildProcess, die_with_parent

if TYPE_CHECKING:
    from actors.runtime._actor import Actor
    from actors.runtime._ask import ask

# `Actor` and `ask` load when first asked for: an engine child imports `_supervisor` only.
__getattr__ = lazy_names(__name__, {"Actor": "actors.runtime._actor", "ask": "actors.runtime._ask"})


__all__ = ["Actor", "Backoff", "ChildProcess", "ask", "die_with_parent"]

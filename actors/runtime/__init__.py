"""The generic actor runtime, free of anything LLM: `Actor` (a thread, its sockets, a poll loop,
a start/stop handshake), `ChildProcess` supervision (pidfd, kill, back-off), and `ask()` (one
query, one answer, with a deadline) for callers outside a node."""

from actors.runtime._actor import Actor
from actors.runtime._ask import ask
from actors.runtime._supervisor import Backoff, ChildProcess, die_with_parent

__all__ = ["Actor", "Backoff", "ChildProcess", "ask", "die_with_parent"]

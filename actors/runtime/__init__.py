"""The generic actor runtime, free of anything LLM: `Actor` (a thread, its sockets, a poll loop,
a start/stop handshake), `ChildProcess` supervision (pidfd, kill, back-off), and `ask()` (one
query, one answer, with a deadline) for callers outside a node."""

from typing import TYPE_CHECKING, Any

from actors.runtime._supervisor import Backoff, ChildProcess, die_with_parent

if TYPE_CHECKING:
    from actors.runtime._actor import Actor
    from actors.runtime._ask import ask


def __getattr__(name: str) -> Any:
    """`Actor` and `ask` load when first asked for: an engine child imports `_supervisor` only."""
    if name == "Actor":
        from actors.runtime._actor import Actor

        return Actor
    if name == "ask":
        from actors.runtime._ask import ask

        return ask
    raise AttributeError(f"module 'actors.runtime' has no attribute {name!r}")


__all__ = ["Actor", "Backoff", "ChildProcess", "ask", "die_with_parent"]

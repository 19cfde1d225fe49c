"""Where a request goes: rendezvous (highest-random-weight) hashing of its session over the
nodes that can serve it, so that a node joining or leaving moves only the sessions it must."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable


def rendezvous(session: str, nodes: Iterable[str]) -> list[str]:
    """`nodes` in this session's order of preference (stable for a given session and node)."""

    def weight(node: str) -> bytes:
        return hashlib.blake2b(f"{session}\x00{node}".encode(), digest_size=8).digest()

    return sorted(nodes, key=weight, reverse=True)


def choose(session: str, nodes: Iterable[str], has_room: Callable[[str], bool]) -> str | None:
    """The session's preferred node among those with room, else its preferred node anyway."""
    order = rendezvous(session, nodes)
    return next((n for n in order if has_room(n)), order[0] if order else None)

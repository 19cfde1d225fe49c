"""The router's table of peers: who is live, who is near, what each serves and whether it has
room — from the gossip actor's `MeshView`s, corrected by what this router itself sent and saw end.
Pure and clock-driven (the router passes `now`); no sockets.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from actors._config import NodeConfig
from actors.wire._messages import Load, MeshView, PeerRow

_FREED_MEMORY_S = 10.0  # how long an ended forward is remembered (far longer than a heartbeat)


class PeerTable:
    """Live peers (alive or suspect) and which of them are within `max_rtt_ms`.

    A suspect peer keeps its work (SWIM: suspicion is not death; failover covers a real one), and
    a near peer may exceed the limit by a quarter before it counts as far, so that a busy moment
    on a loaded machine does not move sessions back and forth."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.live: dict[str, PeerRow] = {}  # node id -> its `mesh-ctl peers` row
        self.near: set[str] = set()
        self._heard: dict[str, float] = {}  # when each peer's gossiped load was measured
        self._freed: dict[str, deque[float]] = {}  # when our forwards to each peer ended

    def update(self, view: MeshView, now: float) -> None:
        live = {p.node_id: p for p in view.peers if p.state in ("alive", "suspect")}
        near = set()
        for node, peer in live.items():
            rtt = peer.rtt_ms
            limit = self.config.max_rtt_ms * (1.25 if node in self.near else 1.0)
            if rtt is None or rtt <= limit:
                near.add(node)
        self.live, self.near = live, near
        self._heard = {n: now - p.heard_s_ago for n, p in live.items() if p.heard_s_ago is not None}

    def serving(self, model: str, exclude: Iterable[str] = (), *, here: bool = False) -> list[str]:
        """Peers serving `model`, but `exclude`: the near ones; if neither they nor this node
        (`here`) can, the far ones (a far node proxies to the mesh, DESIGN §2.5; and a far
        replica beats failing a request)."""
        skip = set(exclude)
        serving = [n for n, p in self.live.items() if model in p.models and n not in skip]
        near = [n for n in serving if n in self.near]
        return near if near or here else serving

    def models(self) -> set[str]:
        return {m for p in self.live.values() for m in p.models}

    def ended(self, node: str, now: float) -> None:
        """A request this router forwarded to `node` ended (its slot there is free again)."""
        self._freed.setdefault(node, deque()).append(now)

    def has_room(self, node: str, ours: int, now: float) -> bool:
        """Whether `node` can start one more request now. Gossiped load is a heartbeat old or
        more: count the `ours` we have running there, and take off what of ours ended there
        after the figure was measured (it may still hold them)."""
        peer = self.live.get(node)
        if peer is None:
            return False
        load = peer.load or Load(slots=1)
        freed = self._freed.get(node, deque())
        while freed and freed[0] < now - _FREED_MEMORY_S:
            freed.popleft()
        measured = self._heard.get(node, 0.0) - (peer.rtt_ms or 0.0) / 1000
        ended = sum(1 for t in freed if t >= measured)
        gossiped = load.in_flight + load.queued - ended
        return max(gossiped, ours) < load.slots

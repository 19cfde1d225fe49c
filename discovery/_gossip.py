"""The gossip actor: heartbeats over ZeroMQ PUB/SUB, SWIM-style membership, RTT.

Every `heartbeat_interval_s` the node publishes a `Heartbeat` on its gossip port (zmq_port + 2):
who it is, its models and load, its view of the mesh, and echoes of the peers' last heartbeats so
that each peer can measure its round-trip time to us. It subscribes to every peer it learns of —
from mDNS, from `--peer` seeds, or from another node's view. Heartbeats of another mesh or
protocol version are ignored and counted. On stop it publishes `left` and flushes it.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from actors import GOSSIP_PORT_OFFSET, PROTOCOL_VERSION, Actor, Answer, Query, encode
from actors.wire._codec import peek_version
from actors.wire._messages import Heartbeat, MeshView, PeerSeen
from discovery._mdns import Advert
from discovery._membership import Change, Membership

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Peer:
    host: str
    zmq_port: int
    http_port: int = 0
    role: str = "unknown"
    models: tuple[str, ...] = ()
    load: dict[str, Any] | None = None
    rtt_samples: deque[float] = field(default_factory=deque)
    rtts: dict[str, float] = field(default_factory=dict)  # what it measures to its peers (ms)

    @property
    def rtt_ms(self) -> float | None:
        return statistics.median(self.rtt_samples) if self.rtt_samples else None

    knows_us: bool = False  # their last heartbeat's view had us in it
    their_sent_at: float = 0.0  # their clock, last heartbeat we heard
    heard_at: float = 0.0  # our clock, when we heard it


def gossip_endpoint(host: str, zmq_port: int) -> str:
    return f"tcp://{host}:{zmq_port + GOSSIP_PORT_OFFSET}"


class Gossip(Actor):
    """Owns the node's membership picture; answers `Query("peers")` on `query_endpoint`."""

    def __init__(
        self,
        ctx: zmq.Context,
        *,
        me: Advert,
        router_endpoint: str,
        query_endpoint: str,
        inbox_endpoint: str,
        seeds: Sequence[tuple[str, int]] = (),
        bind_endpoint: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(ctx, "gossip", **kwargs)
        self.me = me
        self.tick_interval_s = self.config.heartbeat_interval_s
        self.router_endpoint = router_endpoint
        self.query_endpoint = query_endpoint
        self.inbox_endpoint = inbox_endpoint
        self.seeds = list(seeds)
        self.bind_endpoint = bind_endpoint or gossip_endpoint(me.host, me.zmq_port)
        # A higher incarnation after every restart: a restarted node is never taken for its ghost.
        self.membership = Membership(
            me.node_id,
            incarnation=time.time_ns() // 1_000_000,
            now=self.clock(),
            config=self.config,
        )
        self._peers: dict[str, _Peer] = {}
        self._connected: set[str] = set()
        self._models: list[str] = []
        self.far = False  # over the RTT limit to every serving peer: an API client only
        self._load: dict[str, Any] = {}
        self._pub: zmq.Socket | None = None
        self._sub: zmq.Socket | None = None
        self._router: zmq.Socket | None = None
        self._hellos: dict[tuple[str, int], zmq.Socket] = {}
        self._next_hello = 0.0

    # -- lifecycle ----------------------------------------------------------------------------

    def setup(self) -> None:
        self._pub = self.socket(zmq.PUB)
        self._pub.bind(self.bind_endpoint)
        self._sub = self.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.on_socket(self._sub, self._on_heartbeat)
        self._router = self.socket(zmq.DEALER)
        self._router.connect(self.router_endpoint)
        self.on_socket(self._router, self._on_router)
        queries = self.socket(zmq.ROUTER)
        queries.bind(self.query_endpoint)
        self.on_socket(queries, lambda frames: self._on_query(queries, frames))
        inbox = self.socket(zmq.PULL)
        inbox.bind(self.inbox_endpoint)
        self.on_socket(inbox, self._on_inbox)
        for host, port in self.seeds:
            self._subscribe(host, port)

    def teardown(self) -> None:
        self.membership.leave()
        if self._pub is not None:
            self._pub.setsockopt(zmq.LINGER, int(self.config.leave_flush_s * 1000))
            self._publish()

    def on_tick(self, now: float) -> None:
        for change in self.membership.tick(now):
            self._log_change(change)
        self._update_latency_class()
        self._publish()
        assert self._router is not None
        self._router.send(encode(Query(request_id="gossip", what="status")))
        self._send_view()
        if now >= self._next_hello:
            self._greet_strangers()
            self._next_hello = now + self.config.hello_interval_s

    # -- inputs -------------------------------------------------------------------------------

    def _on_inbox(self, frames: list[bytes]) -> None:
        seen = self.decode(frames[-1], "discovery")
        if isinstance(seen, PeerSeen):
            self._subscribe(seen.host, seen.zmq_port)

    def _on_router(self, frames: list[bytes]) -> None:
        answer = self.decode(frames[-1], "router")
        if isinstance(answer, Answer):
            self._models = list(answer.data.get("local_ready", []))
            self._load = {
                "in_flight": answer.data.get("in_flight", 0),
                "queued": sum(answer.data.get("queues", {}).values()),
                "slots": sum(w.get("slots", 0) for w in answer.data.get("workers", [])),
            }

    def _on_heartbeat(self, frames: list[bytes]) -> None:
        frame = frames[-1]
        version = peek_version(frame)
        if version is not None and version != PROTOCOL_VERSION:
            self.stats["other_version"] += 1
            self.warn_once("version", "gossip: ignoring heartbeats of protocol version %s", version)
            return
        beat = self.decode(frame, "gossip")
        if not isinstance(beat, Heartbeat) or beat.node_id == self.me.node_id:
            return
        if beat.mesh != self.me.mesh:
            self.stats["other_mesh"] += 1
            return
        now = self.clock()
        news = self._remember(beat, now)
        for change in self.membership.heard(beat.node_id, beat.incarnation, now):
            self._log_change(change)
            news = True
        if news:  # a node joined or changed what it serves: tell the router now, not next tick
            self._send_view()
        for row in beat.view:
            self._hear_rumor(row, now)

    def _remember(self, beat: Heartbeat, now: float) -> bool:
        """Take in a peer's heartbeat; True if it changed the models or role we knew it by."""
        peer = self._peers.setdefault(beat.node_id, _Peer(host=beat.host, zmq_port=beat.zmq_port))
        news = (peer.models, peer.role) != (tuple(beat.models), beat.role)
        peer.host, peer.zmq_port, peer.http_port = beat.host, beat.zmq_port, beat.http_port
        peer.role, peer.models, peer.load = beat.role, tuple(beat.models), beat.load
        peer.rtts = {
            str(n): float(ms) for n, ms in beat.rtts.items() if isinstance(ms, int | float) and ms >= 0
        }
        peer.their_sent_at, peer.heard_at = beat.sent_at, now
        peer.knows_us = any(row and row[0] == self.me.node_id for row in beat.view)
        echo = beat.echoes.get(self.me.node_id)
        if echo is not None and len(echo) == 2:
            sample_ms = max(0.0, (now - echo[0] - echo[1]) * 1000)
            peer.rtt_samples.append(sample_ms)
            if len(peer.rtt_samples) > self.config.rtt_window:
                peer.rtt_samples.popleft()
        self._subscribe(beat.host, beat.zmq_port)
        return news

    def _send_view(self) -> None:
        assert self._router is not None
        self._router.send(encode(MeshView(peers=self.peers())))

    def _hear_rumor(self, row: list[Any], now: float) -> None:
        try:
            node_id, state, incarnation, host, zmq_port = row
            if state not in ("alive", "suspect", "dead", "left") or not isinstance(incarnation, int):
                raise ValueError(state)
        except (TypeError, ValueError):
            self.stats["bad_view_rows"] += 1
            return
        for change in self.membership.rumor(str(node_id), state, incarnation, now):
            self._log_change(change)
        if (
            state == "alive"
            and node_id != self.me.node_id
            and isinstance(host, str)
            and isinstance(zmq_port, int)
        ):
            self._peers.setdefault(str(node_id), _Peer(host=host, zmq_port=zmq_port))
            self._subscribe(host, zmq_port)

    def _on_query(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        query = self.decode(frames[-1], "control")
        if isinstance(query, Query):
            data = {"peers": self.peers(), "role": self.role}
            sock.send_multipart([frames[0], encode(Answer(request_id=query.request_id, data=data))])

    # -- latency class ------------------------------------------------------------------------

    @property
    def role(self) -> str:
        """What this node does for the mesh now: its configured role, or "client" while far."""
        return "client" if self.far else self.me.role

    def _update_latency_class(self) -> None:
        """Become an API client only when every serving peer is over `max_rtt_ms` from us while
        some of them are near each other (the mesh is elsewhere); come back below 80 % of it.

        Two lone nodes far apart both keep serving: neither is "the mesh" for the other."""
        limit = self.config.max_rtt_ms
        alive = {n for n, m in self.membership.members().items() if m.state == "alive"}
        serving = {n: p for n, p in self._peers.items() if n in alive and p.models}
        rtts = [p.rtt_ms for p in serving.values()]
        if not serving or any(r is None for r in rtts):
            far = False
        elif self.far:
            far = all(r is not None and r > 0.8 * limit for r in rtts)
        else:
            mesh_elsewhere = any(
                0 <= p.rtts.get(other, limit + 1) <= limit
                for n, p in serving.items()
                for other in serving
                if other != n
            )
            far = mesh_elsewhere and all(r is not None and r > limit for r in rtts)
        if far != self.far:
            log.warning(
                "%s: every serving peer is %s %.0f ms away",
                "acting as an API client only" if far else "serving again",
                "over" if far else "no longer all over",
                limit,
            )
            self.far = far

    # -- outputs ------------------------------------------------------------------------------

    def peers(self) -> list[dict[str, Any]]:
        """Every node we know but ourselves, as `mesh-ctl peers --json` shows them."""
        rows = []
        now = self.clock()
        for node_id, member in sorted(self.membership.members().items()):
            peer = self._peers.get(node_id)
            rows.append(
                {
                    "node_id": node_id,
                    "host": peer.host if peer else "",
                    "state": member.state,
                    "rtt_ms": _rounded(peer.rtt_ms) if peer else None,
                    "role": peer.role if peer else "unknown",
                    "models": list(peer.models) if peer else [],
                    "incarnation": member.incarnation,
                    "zmq_port": peer.zmq_port if peer else None,
                    "http_port": peer.http_port if peer else None,
                    "load": peer.load if peer else None,
                    "rtts": dict(peer.rtts) if peer else {},
                    # how old `load` is: the router discounts what it saw end since
                    "heard_s_ago": round(now - peer.heard_at, 3) if peer and peer.heard_at else None,
                }
            )
        return rows

    def _publish(self) -> None:
        assert self._pub is not None
        now = self.clock()
        view = []
        for node_id, state, incarnation in self.membership.view():
            peer = self._peers.get(node_id)
            host, port = (
                (self.me.host, self.me.zmq_port)
                if node_id == self.me.node_id
                else ((peer.host, peer.zmq_port) if peer else ("", 0))
            )
            view.append([node_id, state, incarnation, host, port])
        beat = Heartbeat(
            node_id=self.me.node_id,
            mesh=self.me.mesh,
            incarnation=self.membership.incarnation,
            host=self.me.host,
            zmq_port=self.me.zmq_port,
            http_port=self.me.http_port,
            role="left" if self.membership.left else self.role,
            models=[] if self.far else self._models,
            load=self._load,
            sent_at=now,
            echoes={n: [p.their_sent_at, now - p.heard_at] for n, p in self._peers.items() if p.heard_at},
            view=view,
            rtts={n: round(p.rtt_ms, 2) for n, p in self._peers.items() if p.rtt_ms is not None},
        )
        self._pub.send(encode(beat))

    def _greet_strangers(self) -> None:
        """Say where we are to seeds we have not heard from, and to peers whose heartbeats show
        they do not hear us (their mDNS missed us, say): PUB/SUB only flows one way."""
        heard = {(p.host, p.zmq_port) for p in self._peers.values() if p.heard_at}
        targets = {seed for seed in self.seeds if seed not in heard}
        targets |= {(p.host, p.zmq_port) for p in self._peers.values() if p.heard_at and not p.knows_us}
        hello = encode(PeerSeen(host=self.me.host, zmq_port=self.me.zmq_port, node_id=self.me.node_id))
        for address in targets:
            sock = self._hellos.get(address)
            if sock is None:  # a DEALER to that node's control port
                sock = self._hellos[address] = self.socket(zmq.DEALER)
                sock.connect(f"tcp://{address[0]}:{address[1]}")
            try:
                sock.send(hello, zmq.NOBLOCK)
            except zmq.Again:
                pass  # not up yet, or not reachable: the next greeting tries again

    def _subscribe(self, host: str, zmq_port: int) -> None:
        if (host, zmq_port) == (self.me.host, self.me.zmq_port) or not host:
            return
        endpoint = gossip_endpoint(host, zmq_port)
        if endpoint in self._connected:
            return
        assert self._sub is not None
        self._sub.connect(endpoint)
        self._connected.add(endpoint)

    def _log_change(self, change: Change) -> None:
        level = logging.WARNING if change.new in ("suspect", "dead") else logging.INFO
        log.log(
            level,
            "peer %s: %s -> %s (incarnation %d)",
            change.node_id,
            change.old,
            change.new,
            change.incarnation,
        )


def _rounded(ms: float | None) -> float | None:
    return round(ms, 2) if ms is not None else None

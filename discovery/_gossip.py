"""The gossip actor: heartbeats over ZeroMQ PUB/SUB, SWIM-style membership, RTT.

Every `heartbeat_interval_s` the node publishes a `Heartbeat` on its gossip port (zmq_port + 2):
who it is, its models and load, its view of the mesh, echoes of the peers' last heartbeats so
that each peer can measure its round-trip time to us, and what it offers dense splits (from its
stage host) and the splits it heads (from its split heads), both handed in on the inbox.
It subscribes to every peer it learns of —
from mDNS, from `--peer` seeds, or from another node's view. Heartbeats of another mesh or
protocol version are ignored and counted. On stop it publishes `left` and flushes it.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from actors import GOSSIP_PORT_OFFSET, PROTOCOL_VERSION, ZMQ_PORT_SPAN, Actor, Answer, Query, encode
from actors.wire import Heartbeat, MeshView, PeerSeen, peek_version
from actors.wire._curve import NotAMember, dial
from actors.wire._messages import Demand, Echo, Load, Offer, PeerRow, SplitNews, SplitRow, ViewRow
from discovery._claims import ClaimSigner
from discovery._elastic import Elastic, Standby
from discovery._mdns import Advert
from discovery._membership import Change, Membership
from discovery._trust import Trust

log = logging.getLogger(__name__)
_REARM_EVERY_S = 10.0  # how often the gossip connection of a member held dead is made afresh


@dataclass(slots=True)
class _Peer:
    host: str
    zmq_port: int
    http_port: int = 0
    role: str = "unknown"
    models: tuple[str, ...] = ()
    load: Load | None = None
    rtt_samples: deque[float] = field(default_factory=deque)
    rtts: dict[str, float] = field(default_factory=dict)  # what it measures to its peers (ms)
    offer: Offer | None = None
    splits: list[SplitRow] = field(default_factory=list)
    demand: dict[str, Demand] = field(default_factory=dict)  # unmet demand at it, per model
    standby_for: tuple[str, ...] = ()
    claims: tuple[str, ...] = ()
    claimed_at: dict[str, float] = field(default_factory=dict)  # our clock: since when each claim stands
    proofs: dict[tuple[str, int], bytes] = field(
        default_factory=dict
    )  # its signed (state, incarnation) claims

    def keep_proof(self, row: ViewRow) -> None:
        """Keep the member's signed claim of `row` to relay it (only the newest few)."""
        if row.proof and len(row.proof) == 64:
            self.proofs[(row.state, row.incarnation)] = row.proof
            if len(self.proofs) > 4:
                del self.proofs[min(self.proofs, key=lambda k: k[1])]

    @property
    def rtt_ms(self) -> float | None:
        return statistics.median(self.rtt_samples) if self.rtt_samples else None

    knows_us: bool = False  # their last heartbeat's view had us in it
    their_sent_at: float = 0.0  # their clock, last heartbeat we heard
    heard_at: float = 0.0  # our clock, when we heard it
    rearmed_at: float = 0.0  # our clock, when we last reconnected to it while it was dead


_ROSTER_RETRY_S = 2.0  # a roster asked for and not received this long is asked for again


MAX_PEER_DEMAND = 1000.0  # units of unmet demand one peer's report counts for at most


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
        on_collision: Callable[[str], None] | None = None,
        view_endpoints: Sequence[str] = (),
        standby_for: Sequence[str] = (),
        on_elastic: Callable[[str, str], None] | None = None,
        trust: Trust | None = None,
        **kwargs: Any,
    ) -> None:
        """`on_collision(why)` is called (on this actor's thread) when another live node process
        uses our node id and we are the one that must take a fresh id; `view_endpoints` get the
        mesh view too (PUSH), like the router. `standby_for`: models this node holds and may load
        when the mesh needs them; `on_elastic(action, model)` ("promote" or "step_back") is called
        on this actor's thread when it should."""
        super().__init__(ctx, "gossip", **kwargs)
        self.me = me
        self.tick_interval_s = self.config.heartbeat_interval_s
        self.router_endpoint = router_endpoint
        self.query_endpoint = query_endpoint
        self.inbox_endpoint = inbox_endpoint
        self.seeds = list(seeds)
        self.bind_endpoint = bind_endpoint or gossip_endpoint(me.host, me.zmq_port)
        self.instance = secrets.token_hex(8)  # this process: tells a clone of our id from us
        self.on_collision = on_collision
        self.collision: str | None = None  # why we gave up our id, once we have
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
        self._load = Load()
        self.offer: Offer | None = None  # what the stage host says we offer dense splits
        self.splits: list[SplitRow] = []  # the splits this node heads
        self.view_endpoints = list(view_endpoints)
        self.elastic = Elastic(me.node_id, standby_for, self.config)
        self.on_elastic = on_elastic
        self.role_override: str | None = None  # set by the node: "serving", "standby", "draining"
        self._demand: dict[str, Demand] = {}  # our router's, per model
        self._views: list[zmq.Socket] = []
        self._pub: zmq.Socket | None = None
        self._sub: zmq.Socket | None = None
        self._router: zmq.Socket | None = None
        self._hellos: dict[tuple[str, int], zmq.Socket] = {}
        self._next_hello = 0.0
        self.trust = trust
        self.signed = ClaimSigner(trust.keyring, me.mesh) if trust is not None else None
        self._roster_fetch: tuple[zmq.Socket, float] | None = None  # (socket, when asked)
        self._revoked = False  # the keyring dropped members: cut their connections (next tick)
        if trust is not None:
            trust.keyring.on_update(self._keyring_changed)

    # -- lifecycle ----------------------------------------------------------------------------

    def setup(self) -> None:
        self._pub = self.socket(zmq.PUB)
        self.listen(self._pub, self.bind_endpoint, "gossip")
        self._sub = self.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        # ZeroMQ drops (and disconnects) a sender of a larger frame before we ever unpack it.
        self._sub.setsockopt(zmq.MAXMSGSIZE, self.config.max_gossip_frame_bytes)
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
        for endpoint in self.view_endpoints:
            push = self.socket(zmq.PUSH)
            push.connect(endpoint)
            self._views.append(push)

    def teardown(self) -> None:
        self.membership.leave()
        if self._pub is not None:
            self._pub.setsockopt(zmq.LINGER, int(self.config.leave_flush_s * 1000))
            self._publish()

    # Alone (no member known, no demand, no claim) and serving what we will serve: nobody times our
    # heartbeats out, so one a second will do until a peer appears (any message asks `idle()`
    # again: fast ticks at once). While a serving node's model loads, the fast ticks carry its
    # readiness out at once.
    idle_tick_s = 1.0

    def idle(self) -> bool:
        alone = not self._peers and not self.membership.members()
        settled = bool(self._models) or self.me.role != "serving"
        return alone and settled and not self._demand and not self.elastic.claims

    def on_tick(self, now: float) -> None:
        if self._revoked:
            self._cut_revoked()
        for change in self.membership.tick(now):
            self._log_change(change)
        self._prune()
        self._update_latency_class()
        self._elastic(now)
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
            self._subscribe(seen.host, seen.zmq_port, seen.node_id or None)
        elif isinstance(seen, Offer):  # from our own stage host (in-process)
            self.offer = seen
        elif isinstance(seen, SplitNews):  # from our own split heads (in-process)
            models = {row.model for row in seen.splits}
            self.splits = [r for r in self.splits if r.model not in models] + list(seen.splits)

    def _on_router(self, frames: list[bytes]) -> None:
        answer = self.decode(frames[-1], "router")
        if isinstance(answer, Answer):  # our own router's status (in-process, trusted)
            data = answer.data
            self._models = list(data["local_ready"])
            self._demand = {m: Demand(**d) for m, d in data.get("demand", {}).items()}
            self._load = Load(
                in_flight=data["in_flight"],
                queued=sum(data["queues"].values()),
                slots=sum(w["slots"] for w in data["workers"]),
            )

    def _on_heartbeat(self, frames: list[bytes]) -> None:
        frame = frames[0]  # then its signature, on a secured mesh
        version = peek_version(frame)
        if version is not None and version != PROTOCOL_VERSION:
            self.stats["other_version"] += 1
            self.warn_once("version", "gossip: ignoring heartbeats of protocol version %s", version)
            return
        beat = self.decode(frame, "gossip")
        if not isinstance(beat, Heartbeat):
            return
        if beat.mesh != self.me.mesh:
            self.stats["other_mesh"] += 1
            return
        if self.signed is not None and not self.signed.verify_beat(beat, frames):
            self.stats["forged_heartbeats"] += 1
            self.warn_once(
                f"forged:{beat.node_id}", "gossip: dropped a heartbeat not signed by member %s", beat.node_id
            )
            return
        if beat.node_id == self.me.node_id:
            if beat.instance != self.instance:
                self._collide(beat)
            return
        if not valid_address(beat.host, beat.zmq_port):
            self.stats["bad_heartbeats"] += 1
            return
        now = self.clock()
        changes = self.membership.heard(beat.node_id, beat.incarnation, now)
        if self.membership.state_of(beat.node_id) is None:
            self.stats["refused_peers"] += 1  # the table is full
            return
        news = self._remember(beat, now)
        for change in changes:
            self._log_change(change)
            news = True
        if news:  # a node joined or changed what it serves: tell the router now, not next tick
            self._send_view()
        for row in beat.view:
            self._hear_rumor(row, now, own_word=row.node_id == beat.node_id)
        if self.trust is not None and beat.roster > self.trust.keyring.version:
            self._fetch_roster(beat.node_id, now)

    def _remember(self, beat: Heartbeat, now: float) -> bool:
        """Take in a peer's heartbeat; True if it changed the models or role we knew it by."""
        peer = self._peers.setdefault(beat.node_id, _Peer(host=beat.host, zmq_port=beat.zmq_port))
        news = (peer.models, peer.role) != (tuple(beat.models), beat.role)
        peer.host, peer.zmq_port, peer.http_port = beat.host, beat.zmq_port, beat.http_port
        peer.role, peer.models, peer.load = beat.role, tuple(beat.models), beat.load
        news = news or (peer.offer, peer.splits) != (beat.offer, beat.splits)
        peer.offer, peer.splits = beat.offer, [s for s in beat.splits if s.head == beat.node_id]
        news = news or peer.claims != tuple(beat.claims)
        peer.demand, peer.standby_for, peer.claims = (
            dict(beat.demand),
            tuple(beat.standby_for),
            tuple(beat.claims),
        )
        peer.claimed_at = {m: peer.claimed_at.get(m, now) for m in peer.claims}
        known = self.membership.state_of
        peer.rtts = {n: ms for n, ms in beat.rtts.items() if ms >= 0 and (n == self.me.node_id or known(n))}
        peer.their_sent_at, peer.heard_at = beat.sent_at, now
        peer.knows_us = any(row.node_id == self.me.node_id for row in beat.view)
        echo = beat.echoes.get(self.me.node_id)
        if echo is not None:
            sample_ms = max(0.0, (now - echo.sent_at - echo.held_s) * 1000)
            peer.rtt_samples.append(sample_ms)
            if len(peer.rtt_samples) > self.config.rtt_window:
                peer.rtt_samples.popleft()
        self._subscribe(beat.host, beat.zmq_port, beat.node_id)
        return news

    def _send_view(self) -> None:
        assert self._router is not None
        frame = encode(MeshView(peers=self.peers()))
        self._router.send(frame)
        for push in self._views:
            try:
                push.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                pass  # that actor is not reading (stopping): it gets the next one

    def _hear_rumor(self, row: ViewRow, now: float, *, own_word: bool) -> None:
        if self.signed is not None:
            if not self.signed.credible(row, own_word=own_word):
                self.stats["unproven_rumors"] += 1
                return
            if row.node_id in self._peers:
                self._peers[row.node_id].keep_proof(row)
        for change in self.membership.rumor(row.node_id, row.state, row.incarnation, now, own_word=own_word):
            self._log_change(change)
        if (
            row.state == "alive"
            and row.node_id != self.me.node_id
            and self.membership.state_of(row.node_id) is not None
            and valid_address(row.host, row.zmq_port)
        ):
            peer = self._peers.setdefault(row.node_id, _Peer(host=row.host, zmq_port=row.zmq_port))
            peer.keep_proof(row)
            self._subscribe(row.host, row.zmq_port, row.node_id)

    def _collide(self, beat: Heartbeat) -> None:
        """Another live process gossips with our node id (a copied state dir, say). The one that
        started later (higher incarnation; the instance breaks a tie) takes a fresh id."""
        ours, theirs = (self.membership.incarnation, self.instance), (beat.incarnation, beat.instance)
        why = (
            f"another node at {beat.host}:{beat.zmq_port} uses our node id {self.me.node_id} "
            f"(a copied state directory?)"
        )
        self.warn_once(f"collision:{beat.instance}", "NODE ID COLLISION: %s", why)
        if ours > theirs and self.collision is None:
            self.collision = why
            if self.on_collision is not None:
                self.on_collision(why)

    def _prune(self) -> None:
        """Forget peers that membership no longer holds (expired or evicted tombstones), and
        their gossip connections: nothing the network told us outlives the membership table."""
        members = self.membership.members()
        for node_id in [n for n in self._peers if n not in members]:
            peer = self._peers.pop(node_id)
            endpoint = gossip_endpoint(peer.host, peer.zmq_port)
            if endpoint in self._connected and self._sub is not None:
                self._sub.disconnect(endpoint)
                self._connected.discard(endpoint)
        wanted = set(self.seeds) | {(p.host, p.zmq_port) for p in self._peers.values()}
        for address in [a for a in self._hellos if a not in wanted]:
            self.forget(self._hellos.pop(address))

    def _on_query(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        query = self.decode(frames[-1], "control")
        if isinstance(query, Query):
            m = self.membership
            stats = {
                **self.stats,
                "ignored_rumors": m.ignored_rumors,
                "refused_members": m.refused_members,
                "refutations": m.refutations,
            }
            peers = self.peers()
            splits = self.splits + [s for p in peers if p.state == "alive" for s in p.splits]
            data = {
                "peers": [dataclasses.asdict(p) for p in peers],
                "role": self.role,
                "stats": stats,
                "offer": dataclasses.asdict(self.offer) if self.offer is not None else None,
                "splits": [dataclasses.asdict(s) for s in splits],
                "demand": self.demand_report(),
                "elastic": {
                    "standby_for": sorted(self.elastic.standby_for),
                    "claims": sorted(self.elastic.claims),
                    "promoted": sorted(self.elastic.promoted),
                },
            }
            sock.send_multipart([frames[0], encode(Answer(request_id=query.request_id, data=data))])

    # -- latency class ------------------------------------------------------------------------

    @property
    def role(self) -> str:
        """What this node does for the mesh now: its configured role (or the one the node set
        since: promoted, stepped back, draining), or "client" while far."""
        return "client" if self.far else self.role_override or self.me.role

    # -- elastic serving ----------------------------------------------------------------------

    def mesh_demand(self, now: float) -> dict[str, float]:
        """Unmet demand per model over the mesh: ours plus each live peer's fresh report."""
        total: dict[str, float] = {m: d.units for m, d in self._demand.items()}
        alive = {n for n, m in self.membership.members().items() if m.state == "alive"}
        for node_id, peer in self._peers.items():
            if node_id in alive and now - peer.heard_at <= self.config.demand_ttl_s:
                for model, demand in peer.demand.items():  # bounded: a peer cannot be the whole mesh
                    units = min(max(0.0, demand.units), MAX_PEER_DEMAND)
                    total[model] = total.get(model, 0.0) + units
        return {m: round(units, 3) for m, units in total.items() if units > 0}

    def demand_report(self) -> dict[str, Any]:
        """`status --json`'s `demand`: the mesh's per model, and what of it is ours."""
        mesh = self.mesh_demand(self.clock())
        return {
            m: {"mesh": units, "here": dataclasses.asdict(self._demand.get(m, Demand()))}
            for m, units in sorted(mesh.items())
        }

    def _elastic(self, now: float) -> None:
        alive = {n for n, m in self.membership.members().items() if m.state == "alive"}
        too_old = now - self.config.claim_timeout_s  # a claim that never turns into serving lapses
        others = [
            Standby(
                node_id=n,
                role=p.role,
                standby_for=p.standby_for,
                claims=tuple(m for m in p.claims if p.claimed_at.get(m, now) > too_old),
            )
            for n, p in self._peers.items()
            if n in alive
        ]
        if self.role == "draining":
            return
        demand = self.mesh_demand(now)
        for action, model in self.elastic.step(now, demand, set(self._models), others):
            log.info("elastic: %s %s (mesh demand %s)", action, model, demand.get(model, 0))
            if self.on_elastic is not None:
                self.on_elastic(action, model)

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

    def peers(self) -> list[PeerRow]:
        """Every node we know but ourselves, as `mesh-ctl peers --json` shows them."""
        rows = []
        now = self.clock()
        for node_id, member in sorted(self.membership.members().items()):
            peer = self._peers.get(node_id)
            if peer is None:
                rows.append(
                    PeerRow(
                        node_id=node_id,
                        host="",
                        state=member.state,
                        rtt_ms=None,
                        role="unknown",
                        models=[],
                        incarnation=member.incarnation,
                    )
                )
                continue
            rows.append(
                PeerRow(
                    node_id=node_id,
                    host=peer.host,
                    state=member.state,
                    rtt_ms=_rounded(peer.rtt_ms),
                    role=peer.role,
                    models=list(peer.models),
                    incarnation=member.incarnation,
                    zmq_port=peer.zmq_port,
                    http_port=peer.http_port,
                    load=peer.load,
                    rtts=dict(peer.rtts),
                    heard_s_ago=round(now - peer.heard_at, 3) if peer.heard_at else None,
                    offer=peer.offer,
                    splits=list(peer.splits),
                    demand=dict(peer.demand),
                    standby_for=list(peer.standby_for),
                    claims=list(peer.claims),
                )
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
            row = ViewRow(node_id=node_id, state=state, incarnation=incarnation, host=host, zmq_port=port)
            if self.signed is not None:
                row = self.signed.prove(row, peer.proofs if peer is not None else None)
            view.append(row)
        beat = Heartbeat(
            node_id=self.me.node_id,
            instance=self.instance,
            mesh=self.me.mesh,
            incarnation=self.membership.incarnation,
            host=self.me.host,
            zmq_port=self.me.zmq_port,
            http_port=self.me.http_port,
            role="left" if self.membership.left else self.role,
            models=[] if self.far else self._advertised(),
            load=self._load,
            sent_at=now,
            echoes={
                n: Echo(sent_at=p.their_sent_at, held_s=now - p.heard_at)
                for n, p in self._peers.items()
                if p.heard_at
            },
            view=view,
            rtts={n: round(p.rtt_ms, 2) for n, p in self._peers.items() if p.rtt_ms is not None},
            offer=self.offer,
            splits=self.splits,
            demand=self._demand,
            standby_for=sorted(self.elastic.standby_for - set(self._models)),
            claims=sorted(self.elastic.claims),
            roster=self.trust.keyring.version if self.trust is not None else 0,
        )
        frame = encode(beat)
        if self.signed is None:
            self._pub.send(frame)
        else:
            self._pub.send_multipart([frame, self.signed.sign(frame)])

    def _advertised(self) -> list[str]:
        """The models we serve: those ready here, and a dense split's while it forms or re-forms
        (its head queues their requests meanwhile; a split that cannot form is not advertised)."""
        forming = {row.model for row in self.splits if row.state != "failed"}
        return sorted(set(self._models) | forming)

    def _greet_strangers(self) -> None:
        """Say where we are to seeds we have not heard from, and to peers whose heartbeats show
        they do not hear us (their mDNS missed us, say): PUB/SUB only flows one way."""
        heard = {(p.host, p.zmq_port) for p in self._peers.values() if p.heard_at}
        targets = {seed for seed in self.seeds if seed not in heard}
        targets |= {(p.host, p.zmq_port) for p in self._peers.values() if p.heard_at and not p.knows_us}
        self._rearm_dead()
        hello = encode(PeerSeen(host=self.me.host, zmq_port=self.me.zmq_port, node_id=self.me.node_id))
        for address in targets:
            sock = self._hellos.get(address)
            if sock is None:  # a DEALER to that node's control port
                sock = self.dial(zmq.DEALER, f"tcp://{address[0]}:{address[1]}", self._node_at(address))
                if sock is None:
                    continue
                self._hellos[address] = sock
            try:
                sock.send(hello, zmq.NOBLOCK)
            except zmq.Again:
                pass  # not up yet, or not reachable: the next greeting tries again

    def _rearm_dead(self) -> None:
        """Reconnect now and then to members we hold dead. ZeroMQ retries a lost connection by
        itself, but never one it cut for a protocol error (an oversized frame, say): if that peer
        comes back, re-arming lets us hear it again."""
        now = self.clock()
        for node_id, peer in self._peers.items():
            if self.membership.state_of(node_id) != "dead" or now - peer.rearmed_at < _REARM_EVERY_S:
                continue
            peer.rearmed_at = now
            endpoint = gossip_endpoint(peer.host, peer.zmq_port)
            if endpoint in self._connected and self._sub is not None:
                self._sub.disconnect(endpoint)
                self._sub.connect(endpoint)

    def _subscribe(self, host: str, zmq_port: int, node_id: str | None = None) -> None:
        """Hear the heartbeats of the node at that address (on a secured mesh: only if it is a
        member, `node_id` or the one the roster places there; CURVE then proves it is)."""
        if (host, zmq_port) == (self.me.host, self.me.zmq_port) or not host:
            return
        endpoint = gossip_endpoint(host, zmq_port)
        if endpoint in self._connected:
            return
        if len(self._connected) >= self.config.max_peers:
            self.stats["refused_subscriptions"] += 1
            return
        assert self._sub is not None
        try:
            dial(self._sub, endpoint, node_id or self._node_at((host, zmq_port)))
        except NotAMember as err:
            self.stats["not_members"] += 1
            self.warn_once(f"not-member:{endpoint}", "gossip: not subscribing to %s: %s", endpoint, err)
            return
        self._connected.add(endpoint)

    def _node_at(self, address: tuple[str, int]) -> str | None:
        """The node we know at `address` (from its heartbeats, else the roster), if any."""
        for node_id, peer in self._peers.items():
            if (peer.host, peer.zmq_port) == address and peer.heard_at:
                return node_id
        member = self.trust.keyring.at(*address) if self.trust is not None else None
        return member.node_id if member is not None else None

    # -- a secured mesh's roster ------------------------------------------------------------

    def _fetch_roster(self, node_id: str, now: float) -> None:
        """Ask `node_id` (a member that holds a newer roster) for it; one question at a time."""
        assert self.trust is not None
        if self._roster_fetch is not None:
            if now - self._roster_fetch[1] < _ROSTER_RETRY_S:
                return
            self.forget(self._roster_fetch[0])
        peer = self._peers.get(node_id)
        if peer is None:
            return
        sock = self.dial(zmq.DEALER, f"tcp://{peer.host}:{peer.zmq_port}", node_id)
        if sock is None:
            return
        self._roster_fetch = (sock, now)
        self.on_socket(sock, lambda frames: self._on_roster(sock, frames))
        sock.send(encode(Query(request_id="roster", what="roster")))

    def _on_roster(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        assert self.trust is not None
        answer = self.decode(frames[-1], "roster")
        if self._roster_fetch is not None and self._roster_fetch[0] is sock:
            self._roster_fetch = None
        self.forget(sock)
        if isinstance(answer, Answer) and isinstance(answer.data.get("roster"), str):
            try:
                signed = bytes.fromhex(answer.data["roster"])
            except ValueError:
                self.stats["bad_rosters"] += 1
                return
            if not self.trust.adopt(signed):
                self.stats["bad_rosters"] += 1

    def _keyring_changed(self, gone: frozenset[str]) -> None:
        """The keyring's listener (on whichever thread updated it): members were removed."""
        if gone:
            self._revoked = True

    def _cut_revoked(self) -> None:
        """Members were revoked: stop hearing them, and make every subscriber to our heartbeats
        reconnect, so that ZAP admits the remaining members only."""
        assert self.trust is not None and self._pub is not None
        self._revoked = False
        members = self.trust.keyring.members()
        for node_id, peer in list(self._peers.items()):
            if node_id not in members:
                endpoint = gossip_endpoint(peer.host, peer.zmq_port)
                if endpoint in self._connected and self._sub is not None:
                    self._sub.disconnect(endpoint)
                    self._connected.discard(endpoint)
        self.forget(self._pub)
        self._pub = self.socket(zmq.PUB)
        for _ in range(50):  # the closed socket's port is freed by ZeroMQ's I/O thread
            try:
                self.listen(self._pub, self.bind_endpoint, "gossip")
                break
            except zmq.ZMQError:
                time.sleep(0.02)
        log.info("gossip: members revoked; their connections were cut")

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


def valid_address(host: str, port: int) -> bool:
    """A host and ZeroMQ port a peer could really listen on (no endpoint injection)."""
    if not 0 < port < 65536 - ZMQ_PORT_SPAN or not host or len(host) > 253:
        return False
    return all(c.isalnum() or c in ".-:[]" for c in host)

"""What makes a node part of a mesh: its gossip actor, mDNS discovery and `--peer` seeds."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import zmq

from actors import Node, NodeSpec, encode, make_socket
from actors.wire._messages import PeerSeen
from discovery._gossip import Gossip, gossip_endpoint
from discovery._mdns import Advert, MdnsDiscovery, mesh_hash
from discovery._trust import Trust

log = logging.getLogger(__name__)


class MeshMembership:
    """Builds the gossip actor for a `Node` and runs mDNS next to it.

    Use: `Node(spec, more=[m.actor], peers_endpoint=m.query_endpoint, inbox_endpoint=m.inbox_endpoint)`,
    start the node, then
    `m.start_discovery(node)`; `close()` before stopping the node.
    """

    def __init__(
        self,
        spec: NodeSpec,
        *,
        mdns: bool,
        seeds: Sequence[tuple[str, int]] = (),
        advertise: tuple[str, int] | None = None,
        on_collision: Callable[[str], None] | None = None,
        standby_for: Sequence[str] = (),
        on_elastic: Callable[[str, str], None] | None = None,
        trust: Trust | None = None,
    ) -> None:
        """`advertise`: the (host, zmq_port) peers reach us at, when not the bound ones;
        `on_collision`: called (on the gossip thread) when we must give up our node id;
        `standby_for` and `on_elastic`: see `Gossip`."""
        self.on_collision = on_collision
        self.standby_for = list(standby_for)
        self.on_elastic = on_elastic
        self.trust = trust
        self.gossip: Gossip | None = None  # once the node made it
        self.spec = spec
        host, zmq_port = advertise or (spec.host, spec.zmq_port)
        self.identity = Advert(
            node_id=spec.node_id,
            mesh=mesh_hash(spec.mesh),
            host=host,
            zmq_port=zmq_port,
            http_port=spec.http_port,
            role=spec.role,
        )
        self.mdns = mdns
        self.seeds = list(seeds)
        self.query_endpoint = f"inproc://gossip-{spec.node_id}"
        self.inbox_endpoint = f"inproc://gossip-inbox-{spec.node_id}"
        self._discovery: MdnsDiscovery | None = None
        self._push: zmq.Socket | None = None

    def actor(self, node: Node) -> Gossip:
        self.gossip = Gossip(
            node.ctx,
            me=self.identity,
            router_endpoint=node.router_local_endpoint,
            query_endpoint=self.query_endpoint,
            inbox_endpoint=self.inbox_endpoint,
            seeds=self.seeds,
            bind_endpoint=gossip_endpoint(self.spec.host, self.spec.zmq_port),
            on_collision=self.on_collision,
            view_endpoints=node.view_endpoints,
            standby_for=self.standby_for,
            on_elastic=self.on_elastic,
            trust=self.trust,
            config=node.spec.config,
        )
        return self.gossip

    def start_discovery(self, node: Node) -> None:
        """Advertise and browse mDNS on the node's interface (blocks ~2 s for zeroconf's probes)."""
        if not self.mdns:
            return
        # Used only by zeroconf's browser thread, closed here once that thread has stopped.
        self._push = make_socket(node.ctx, zmq.PUSH)
        self._push.connect(self.inbox_endpoint)
        me = self.identity
        advert = Advert(  # mDNS runs on the bound interface: it says the bound address
            node_id=me.node_id,
            mesh=me.mesh,
            host=self.spec.host,
            zmq_port=self.spec.zmq_port,
            http_port=me.http_port,
            role=me.role,
        )
        self._discovery = MdnsDiscovery(advert, on_seen=self._seen, on_gone=lambda node_id: None).start()

    def _seen(self, advert: Advert) -> None:
        """zeroconf's browser thread: hand the address to the gossip actor."""
        if self._push is not None:
            self._push.send(
                encode(PeerSeen(host=advert.host, zmq_port=advert.zmq_port, node_id=advert.node_id))
            )

    def close(self) -> None:
        """Stop mDNS (sending goodbyes); idempotent."""
        if self._discovery is not None:
            self._discovery.close()
            self._discovery = None
        if self._push is not None:
            self._push.close(linger=0)
            self._push = None

"""The control actor: answers `mesh-ctl` over ZeroMQ (ROUTER on the node's first port).

It asks the router for a snapshot and adds what the node knows about itself, without blocking:
each `mesh-ctl` query becomes a router query, and the router's answer completes the reply.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from actors.runtime._actor import Actor
from actors.wire._codec import encode
from actors.wire._curve import INVITE_USER
from actors.wire._messages import Answer, PeerSeen, Query

COMMANDS = ("status", "peers", "models", "splits")
OPERATIONS = ("drain", "promote", "swap")  # commands that change the node (answered at once)
TRUST = ("roster", "enrol", "invite", "revoke")  # a secured mesh's membership (answered at once)
_OWN_ONLY = (*OPERATIONS, "invite", "revoke")  # on a secured node: from its own operator only


@dataclass(slots=True)
class _Pending:
    """A mesh-ctl query waiting for the router's and the gossip actor's answers."""

    client: bytes
    query: Query
    router: dict[str, Any] | None = None
    peers: list[dict[str, Any]] | None = None
    role: str | None = None  # the gossip actor's word on our latency class
    gossip_stats: dict[str, int] | None = None
    splits: list[dict[str, Any]] = field(default_factory=list)  # every split the mesh knows of
    offer: dict[str, Any] | None = None  # what this node offers splits
    demand: dict[str, Any] = field(default_factory=dict)  # unmet demand per model (mesh and here)
    elastic: dict[str, Any] = field(default_factory=dict)  # what we stand by for, claim, promoted


def mesh_models(me: str, router: dict[str, Any], peers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every model served in the mesh, with the nodes serving it (alive peers and this node)."""
    nodes: dict[str, list[str]] = {m: [me] for m in router["local_models"]}
    ready: dict[str, list[str]] = {
        m: [me] if m in router["local_ready"] else [] for m in router["local_models"]
    }
    for peer in peers:
        if peer["state"] != "alive":
            continue
        for m in peer["models"]:
            nodes.setdefault(m, []).append(peer["node_id"])
            ready.setdefault(m, []).append(peer["node_id"])
    return [{"id": m, "nodes": sorted(nodes[m]), "ready_nodes": sorted(ready[m])} for m in sorted(nodes)]


class Control(Actor):
    """Serves `Query(what in COMMANDS)` from mesh-ctl with JSON-ready answers."""

    def __init__(
        self,
        ctx: zmq.Context,
        *,
        endpoint: str,
        router_endpoint: str,
        node_info: dict[str, Any],
        peers_endpoint: str | None = None,
        inbox_endpoint: str | None = None,
        operations: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None,
        trust: Callable[[str, dict[str, Any], str | None], dict[str, Any]] | None = None,
        **kwargs: object,
    ) -> None:
        """`operations(what, args)`: the node's handler of the commands in `OPERATIONS` (it
        answers at once whether it took the command; the work goes on after). `trust(what,
        args, sender)`: a secured node's handler of `TRUST` commands."""
        super().__init__(ctx, "control", **kwargs)  # type: ignore[arg-type]
        self.operations = operations
        self.trust = trust
        self.endpoint = endpoint
        self.router_endpoint = router_endpoint
        self.peers_endpoint = peers_endpoint
        self.inbox_endpoint = inbox_endpoint
        self._inbox: zmq.Socket | None = None
        self.node_info = node_info
        self._started = time.time()
        self._ids = itertools.count()
        self._waiting: dict[str, _Pending] = {}
        self._front: zmq.Socket | None = None
        self._router: zmq.Socket | None = None
        self._gossip: zmq.Socket | None = None

    def setup(self) -> None:
        self._front = self.socket(zmq.ROUTER)
        self._front.setsockopt(zmq.MAXMSGSIZE, self.config.max_frame_bytes)  # refused before unpacking
        self.listen(self._front, self.endpoint, "control")
        self.on_socket(self._front, self._from_ctl)
        self._router = self.socket(zmq.DEALER)
        self._router.connect(self.router_endpoint)
        self.on_socket(self._router, self._from_inside)
        if self.inbox_endpoint is not None:
            self._inbox = self.socket(zmq.PUSH)
            self._inbox.connect(self.inbox_endpoint)
        if self.peers_endpoint is not None:
            self._gossip = self.socket(zmq.DEALER)
            self._gossip.connect(self.peers_endpoint)
            self.on_socket(self._gossip, self._from_inside)

    def _from_ctl(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.stats["dropped_frames"] += 1
            return
        client, frame = frames
        sender = self.sender
        query = self.decode(frame, "mesh-ctl")
        refusal = self._refusal(query, sender)
        if refusal is not None:
            self.stats["refused_commands"] += 1
            self.warn_once(
                f"refused:{sender}:{refusal}", "control: refused a command from %s: %s", sender, refusal
            )
            if isinstance(query, Query):
                self._reply(client, Answer(request_id=query.request_id, data={"error": refusal}))
            return
        if isinstance(query, PeerSeen) and self._inbox is not None:
            self._inbox.send(frame, zmq.NOBLOCK)  # a joining node says hello: gossip subscribes to it
            return
        if not isinstance(query, Query):
            return
        if query.what in TRUST:
            if self.trust is None:
                data = {
                    "error": "this node is not part of a secured mesh (started without --secure or --join)"
                }
            else:
                data = self.trust(query.what, dict(query.args), sender)
            self._reply(client, Answer(request_id=query.request_id, data=data))
            return
        if query.what in OPERATIONS:
            if self.operations is None:
                data = {"error": f"this node takes no {query.what!r} command"}
            else:
                data = self.operations(query.what, dict(query.args))
            self._reply(client, Answer(request_id=query.request_id, data=data))
            return
        if query.what not in COMMANDS:
            error = {"error": f"unknown command {query.what!r}"}
            self._reply(client, Answer(request_id=query.request_id, data=error))
            return
        inner = f"ctl-{next(self._ids)}"
        pending = _Pending(client=client, query=query, peers=None if self._gossip else [])
        self._waiting[inner] = pending
        assert self._router is not None
        self._router.send(encode(Query(request_id=inner, what="status")))
        if self._gossip is not None:
            self._gossip.send(encode(Query(request_id=inner, what="peers")))

    def _refusal(self, query: object, sender: str | None) -> str | None:
        """Why a secured node does not take `query` from `sender` (None: it does). An invite's
        connection may only enrol; changing the node is for its own operator (mesh-ctl with the
        node's --state-dir), not for other members."""
        if sender is None:
            return None  # an open node
        if sender.startswith(INVITE_USER):
            return None if isinstance(query, Query) and query.what == "enrol" else "an invite may only enrol"
        if isinstance(query, Query) and query.what in _OWN_ONLY and sender != self.node_info["node_id"]:
            return f"{query.what} is for this node's own operator (mesh-ctl with its --state-dir)"
        if isinstance(query, Query) and query.what == "enrol":
            return "already a member"
        return None

    def _from_inside(self, frames: list[bytes]) -> None:
        """An answer from the router (status) or the gossip actor (peers)."""
        answer = self.decode(frames[-1], "node")
        if not isinstance(answer, Answer) or answer.request_id not in self._waiting:
            return
        pending = self._waiting[answer.request_id]
        if "peers" in answer.data:
            pending.peers = answer.data["peers"]
            pending.role = answer.data.get("role")
            pending.gossip_stats = answer.data.get("stats")
            pending.splits = answer.data.get("splits") or []
            pending.offer = answer.data.get("offer")
            pending.demand = answer.data.get("demand") or {}
            pending.elastic = answer.data.get("elastic") or {}
        else:
            pending.router = answer.data
        if pending.router is not None and pending.peers is not None:
            del self._waiting[answer.request_id]
            data = self.compose(pending.query.what, pending)
            self._reply(pending.client, Answer(request_id=pending.query.request_id, data=data))

    def compose(self, what: str, pending: _Pending) -> dict[str, Any]:
        """The reply to a mesh-ctl command, from the router's snapshot and the gossip's peers."""
        info = self.node_info
        router, peers, gossip_stats = pending.router, pending.peers or [], pending.gossip_stats
        assert router is not None
        if what == "peers":
            return {"peers": peers}
        if what == "models":
            return {"models": mesh_models(info["node_id"], router, peers)}
        if what == "splits":
            return {"splits": pending.splits}
        # What each actor dropped (bad frames) or failed at (handler errors), by name.
        actors = {**router["actor_stats"], self.name: dict(self.stats)}
        if gossip_stats is not None:
            actors["gossip"] = gossip_stats
        return {
            "node_id": info["node_id"],
            "mesh": info["mesh"],
            "secure": self._front in self._secured,
            "role": pending.role or info["role"],
            "models": router["local_models"],
            "peers": peers,
            "host": info["host"],
            "http_port": info["http_port"],
            "zmq_port": info["zmq_port"],
            "version": info["version"],
            "uptime_s": round(time.time() - self._started, 1),
            "ready": bool(router["local_ready"]),
            "mesh_models": router["models"],
            "workers": router["workers"],
            "queues": router["queues"],
            "in_flight": router["in_flight"],
            "requests": router["requests"],
            "speculative": router["speculative"],
            "dropped_frames": sum(a.get("dropped_frames", 0) for a in actors.values()),
            "handler_errors": sum(a.get("handler_errors", 0) for a in actors.values()),
            "actors": actors,
            "splits": pending.splits,
            "offer": pending.offer,
            "demand": pending.demand,
            "operation": self.operations("state", {}) if self.operations is not None else None,
            "elastic": {**pending.elastic, "draining": router.get("draining", False)},
        }

    def _reply(self, client: bytes, answer: Answer) -> None:
        assert self._front is not None
        try:
            self._front.send_multipart([client, encode(answer)], zmq.NOBLOCK)
        except zmq.ZMQError as err:
            self.warn_once("ctl-send", "control: mesh-ctl client went away: %s", err)

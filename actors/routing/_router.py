"""The router actor: admission, queueing and forwarding of requests to shard-workers.

Frontend: a public ROUTER socket (TCP) that gateways and peer routers talk to with DEALER sockets:
generation, cancels and queries only. Inside: a ROUTER on inproc for this node's own actors — the
only way a mesh view reaches the router. Backend: a ROUTER on inproc that shard-workers connect to.
Each model has a bounded FIFO; a worker takes up to its `slots` requests at once; events flow back
to whoever asked, as they come. Every flight's handling is guarded: an exception ends that request
with an error reply, and a sweep fails any flight nothing would ever answer.
"""

from __future__ import annotations

import hmac
import itertools
import logging
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import replace

import zmq

from actors._config import ROUTER_PORT_OFFSET
from actors._errors import (
    EngineFailed,
    InternalError,
    InvalidRequest,
    ModelNotFound,
    NotReady,
    Overloaded,
    PeerUnavailable,
    Unauthorized,
)
from actors.routing._demand import DemandMeter
from actors.routing._flight import Client, Counters, Flight, WorkerSlots
from actors.routing._peers import PeerTable
from actors.routing._placement import choose
from actors.runtime._actor import Actor
from actors.wire._codec import Message, encode
from actors.wire._messages import (
    TERMINAL_TYPES,
    Accepted,
    Answer,
    Cancel,
    Chunk,
    Demand,
    ErrorReply,
    Finished,
    Generate,
    MeshView,
    Pending,
    Query,
    Started,
    WorkerState,
)
from actors.wire._sockets import remove_ipc

log = logging.getLogger(__name__)
# A peer's refusals that another node may not share: try the next node before telling the client.
_RETRYABLE = tuple(e.code for e in (Overloaded, NotReady, EngineFailed, PeerUnavailable, ModelNotFound))


class Router(Actor):
    """Admits requests per model, forwards them to idle workers and streams answers back."""

    def __init__(
        self,
        ctx: zmq.Context,
        *,
        node_id: str,
        frontend_endpoints: list[str],
        backend_endpoint: str,
        inside_endpoint: str | None = None,
        gateway_endpoint: str | None = None,
        aliases: dict[str, str] | None = None,
        api_keys: frozenset[str] = frozenset(),
        **kwargs: object,
    ) -> None:
        """`aliases`: other names of models this node serves (name -> model id). The node's own
        HTTP gateway comes in on `gateway_endpoint` (ipc: it checked the client's API key);
        requests from the network must carry one of `api_keys` (when there are any) unless the
        port is secured (members only), and forwarded requests carry ours."""
        super().__init__(ctx, "router", **kwargs)  # type: ignore[arg-type]
        self.node_id = node_id
        self.gateway_endpoint = gateway_endpoint
        self.api_keys = api_keys
        self._forward_key = min(api_keys) if api_keys else ""
        self.aliases = dict(aliases or {})
        self.frontend_endpoints = frontend_endpoints
        self.backend_endpoint = backend_endpoint
        self.inside_endpoint = inside_endpoint
        self.counters = Counters()
        self._workers: dict[bytes, WorkerSlots] = {}
        self._queues: dict[str, deque[str]] = {}
        self._held: deque[str] = deque()  # requests waiting for any of their nodes to have room
        self.meter = DemandMeter(self.config.demand_tau_s, self.config.demand_window_s)
        # Set from the node's own thread (plain assignments): a draining node takes no new request
        # for itself; retiring workers (a model swap) get none either.
        self.draining = False
        self.retiring: frozenset[bytes] = frozenset()  # worker identities (their ids, encoded)
        self._homes: OrderedDict[tuple[str, str], str] = OrderedDict()  # (session, model) -> node
        self._flights: dict[str, Flight] = {}
        self._front: zmq.Socket | None = None
        self._inside: zmq.Socket | None = None
        self._back: zmq.Socket | None = None
        self.peers = PeerTable(self.config)
        self._links: dict[str, zmq.Socket] = {}  # DEALER to each such peer's router
        self._monitors: dict[str, zmq.Socket] = {}  # their disconnect events

    def setup(self) -> None:
        self._front = self.socket(zmq.ROUTER)
        self._front.setsockopt(zmq.MAXMSGSIZE, self.config.max_frame_bytes)
        for endpoint in self.frontend_endpoints:
            self.listen(self._front, endpoint, "router")
        self.on_socket(self._front, lambda frames: self._from_client(self._front, frames, inside=False))
        if self.gateway_endpoint is not None:
            gate = self.socket(zmq.ROUTER)
            gate.setsockopt(zmq.MAXMSGSIZE, self.config.max_frame_bytes)
            gate.bind(self.gateway_endpoint)
            self.on_socket(gate, lambda frames: self._from_client(gate, frames, inside=False, keyed=True))
        if self.inside_endpoint is not None:
            inside = self._inside = self.socket(zmq.ROUTER)
            inside.bind(self.inside_endpoint)
            self.on_socket(inside, lambda frames: self._from_client(inside, frames, inside=True))
        self._back = self.socket(zmq.ROUTER)
        self._back.bind(self.backend_endpoint)
        self.on_socket(self._back, self._from_worker)

    def teardown(self) -> None:
        remove_ipc(self.gateway_endpoint)
        for rid in list(self._flights):
            self._end(
                rid, ErrorReply(request_id=rid, code=EngineFailed.code, message="the node is shutting down")
            )

    idle_tick_s = 1.0  # no request in hand, none waiting (the demand average at rest)

    def idle(self) -> bool:
        return not self._flights and not self._held and self.meter.settled()

    def on_tick(self, now: float) -> None:
        self.meter.sample(now, self._waiting())
        self._place_held()
        self._sweep_orphans()
        for rid, flight in list(self._flights.items()):
            if flight.remote is not None and now - flight.remote_heard > self.config.remote_silence_s:
                self._remote_failed(rid, f"node {flight.remote} went silent")
            elif not flight.cancelled and now - flight.last_sent >= self.config.keepalive_interval_s:
                self._to_client(rid, Pending(request_id=rid))

    # -- clients ------------------------------------------------------------------------------

    def _from_client(
        self, sock: zmq.Socket | None, frames: list[bytes], *, inside: bool, keyed: bool = False
    ) -> None:
        """A message from a client: a node's own actor (`inside`), its gateway (`keyed`: the API
        key was checked), or the network (a peer's router, or anyone on an open mesh)."""
        if len(frames) != 2 or sock is None:
            self.stats["dropped_frames"] += 1
            return
        client, frame = frames
        message = self.decode(frame, "node" if inside else "client")
        if isinstance(message, Generate):
            if not (inside or keyed or sock in self._secured) and not self._key_ok(message.api_key):
                self.stats["refused_requests"] += 1
                self.warn_once(
                    "api-key", "router: refused a request without a valid API key from the network"
                )
                why = "this node requires an API key (--api-key) for requests from the network"
                self._send(
                    Client(sock, client),
                    ErrorReply(request_id=message.request_id, code=Unauthorized.code, message=why),
                )
                return
            self._admit(Client(sock, client), message)
        elif isinstance(message, Cancel):
            flight = self._flights.get(message.request_id)
            if flight is not None and flight.client == Client(sock, client):  # only whoever asked
                self._guarded(message.request_id, lambda: self._cancel(message.request_id))
        elif isinstance(message, Query):
            self._send(
                Client(sock, client), Answer(request_id=message.request_id, data=self.snapshot(message.what))
            )
        elif isinstance(message, MeshView) and inside:
            self._on_mesh_view(message)
        elif message is not None:
            self.stats["refused_frames"] += 1  # a kind this port does not take from outside
            self.warn_once("refused", "router: refused a %s from outside the node", type(message).__name__)

    def _key_ok(self, key: str) -> bool:
        return not self.api_keys or any(hmac.compare_digest(key.encode(), k.encode()) for k in self.api_keys)

    def _guarded(self, rid: str, call: Callable[[], None]) -> None:
        """Run one flight's handling; if it raises, that request ends with an error reply (and
        is removed) instead of living forever."""
        try:
            call()
        except Exception as err:
            self.stats["handler_errors"] += 1
            log.exception("router: request %s failed in the router", rid)
            if rid in self._flights:
                self._drop_from_queues(rid)
                self._end(
                    rid, ErrorReply(request_id=rid, code=InternalError.code, message=f"router error: {err}")
                )

    def _sweep_orphans(self) -> None:
        """Fail any flight that nothing will ever answer: not queued, held, at a worker or at a
        peer (a safety net under `_guarded`)."""
        queued = {rid for q in self._queues.values() for rid in q} | set(self._held)
        for rid, flight in list(self._flights.items()):
            if flight.worker is None and flight.remote is None and rid not in queued:
                self.stats["orphans"] += 1
                log.error("router: request %s was orphaned; failing it", rid)
                self._end(
                    rid,
                    ErrorReply(request_id=rid, code=InternalError.code, message="request lost by the router"),
                )

    def _drop_from_queues(self, rid: str) -> None:
        if rid in self._held:
            self._held.remove(rid)
        for queue in self._queues.values():
            if rid in queue:
                queue.remove(rid)

    def _admit(self, client: Client, request: Generate) -> None:
        if request.model in self.aliases:  # another name of a model served here
            request = replace(request, model=self.aliases[request.model])
        rid = request.request_id
        local = [w for w in self._workers.values() if w.state.model_id == request.model]
        remote = self._remote_nodes(request)
        error = None
        if rid in self._flights:
            error = ErrorReply(
                request_id=rid, code=InvalidRequest.code, message=f"duplicate request id {rid}"
            )
        elif not local and not remote:
            served = ", ".join(sorted(self.models())) or "none"
            error = ErrorReply(
                request_id=rid,
                code=ModelNotFound.code,
                message=f"The model '{request.model}' does not exist on this mesh (served: {served})",
                details={"param": "model"},
            )
        elif not remote and all(w.state.state == "failed" for w in local):
            error = ErrorReply(
                request_id=rid,
                code=EngineFailed.code,
                message=f"model failed to load: {local[0].state.detail}",
            )
        if error is not None:
            self._send(client, error)
            return
        self._flights[rid] = Flight(client=client, request=request, last_sent=self.clock())
        self._send(client, Accepted(request_id=rid, node_id=self.node_id))
        self._guarded(rid, lambda: self._place(rid))

    def _place(self, rid: str, why: str = "") -> None:
        """Send an admitted request to its session's node: this one (queue) or a peer (forward)."""
        flight = self._flights[rid]
        request = flight.request
        nodes = self._candidates(flight)
        home = self._homes.get((request.session, request.model)) if request.session else None
        choice: str | None
        if home in nodes:
            # A session stays where it began while that node lives: its KV cache is there (and,
            # for an MoE shard, the experts that shaped its answers so far). Busy or not.
            choice, flexible = home, False
        else:
            choice, flexible = (
                choose(request.session or rid, nodes, lambda n: self._has_room(n, request.model)),
                True,
            )
        if choice is not None and request.session:
            self._homes[(request.session, request.model)] = choice
            self._homes.move_to_end((request.session, request.model))
            while len(self._homes) > self.config.max_sessions:
                self._homes.popitem(last=False)
        if flexible and choice is not None and len(nodes) > 1 and not self._has_room(choice, request.model):
            # Every node is busy: wait here for whichever frees first (still in the session's
            # order of preference), rather than queue behind one while another goes idle.
            self._hold(rid)
        elif choice is None and self.clock() < flight.grace_until:
            self._held.append(rid)  # the mesh view may be a heartbeat behind: wait for the next
        elif choice is None:
            reason = f"{why}; no other node can serve it" if why else "no node can serve it now"
            self._end(rid, ErrorReply(request_id=rid, code=PeerUnavailable.code, message=reason))
        elif choice != self.node_id:
            self._forward(rid, choice)
        elif len(self._queues.setdefault(request.model, deque())) >= self.config.queue_depth_per_model:
            depth = self.config.queue_depth_per_model
            self._end(
                rid,
                ErrorReply(
                    request_id=rid,
                    code=Overloaded.code,
                    message=f"the queue for {request.model} is full ({depth} waiting)",
                    details={"retry_after": self.config.retry_after_s},
                ),
            )
        else:
            flight.tried.add(self.node_id)
            self._queues[request.model].append(rid)
            self._dispatch(request.model)

    def _has_room(self, node: str, model: str) -> bool:
        """Whether `node` can start one more request of `model` now, without queueing it."""
        if node == self.node_id:
            free = sum(w.room for w in self._workers.values() if w.state.model_id == model)
            return free > len(self._queues.get(model, ()))
        ours = sum(1 for f in self._flights.values() if f.remote == node)
        return self.peers.has_room(node, ours, self.clock())

    def _hold(self, rid: str) -> None:
        if len(self._held) >= self.config.queue_depth_per_model:
            self._end(
                rid,
                ErrorReply(
                    request_id=rid,
                    code=Overloaded.code,
                    message=f"every node serving {self._flights[rid].request.model} is busy "
                    f"and {len(self._held)} requests are waiting",
                    details={"retry_after": self.config.retry_after_s},
                ),
            )
        else:
            self._held.append(rid)

    def demand(self) -> dict[str, Demand]:
        """Unmet demand here, per model (`DemandMeter`)."""
        return self.meter.report(self.clock())

    def _waiting(self) -> dict[str, int]:
        """Requests waiting here now, per model: queued for our workers, or held."""
        counts: Counter[str] = Counter()
        for rid in itertools.chain(self._held, *self._queues.values()):
            flight = self._flights.get(rid)
            if flight is not None:
                counts[flight.request.model] += 1
        return counts

    def _place_held(self) -> None:
        """Place waiting requests, oldest first, on the first of their nodes with room."""
        for rid in list(self._held):
            if rid not in self._held:  # placed (or failed) by a nested call meanwhile
                continue
            flight = self._flights.get(rid)
            if flight is None:
                self._held.remove(rid)
                continue
            if self.clock() < flight.not_before:
                continue
            nodes = self._candidates(flight)
            if not nodes and self.clock() < flight.grace_until:
                continue
            if not nodes or any(self._has_room(n, flight.request.model) for n in nodes):
                self._held.remove(rid)
                self._guarded(rid, lambda rid=rid: self._place(rid))  # type: ignore[misc]

    def _cancel(self, rid: str) -> None:
        flight = self._flights.get(rid)
        if flight is None or flight.cancelled:
            return
        self.counters.cancelled += 1  # its outcome: whatever the engine says after this
        if flight.remote is not None:
            self._to_peer(flight.remote, Cancel(request_id=rid))
            self.peers.ended(flight.remote, self.clock())
            del self._flights[rid]
            self._place_held()
            return
        if flight.worker is None:
            if rid in self._held:
                self._held.remove(rid)
            else:
                self._queues[flight.request.model].remove(rid)
            del self._flights[rid]
            return
        flight.cancelled = True  # stays until the worker's terminal event frees the worker
        self._to_worker(flight.worker, Cancel(request_id=rid))

    # -- workers ------------------------------------------------------------------------------

    def _from_worker(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.stats["dropped_frames"] += 1
            return
        identity, frame = frames
        message = self.decode(frame, "worker")
        if isinstance(message, WorkerState):
            if message.state == "retired":
                self._workers.pop(identity, None)
                if not self._serves_here(message.model_id):
                    self._fail_queue(message.model_id, "its worker was retired")
                return
            worker = self._workers.setdefault(identity, WorkerSlots(state=message))
            worker.state = message
            if message.state == "failed":
                self._fail_queue(message.model_id, message.detail)
            self._dispatch(message.model_id)
        elif message is not None and hasattr(message, "request_id"):
            self._from_engine(identity, message)

    def _from_engine(self, identity: bytes, message: Message) -> None:
        rid = message.request_id
        flight = self._flights.get(rid)
        if flight is None or flight.worker != identity:
            return
        if isinstance(message, TERMINAL_TYPES):
            worker = self._workers.get(identity)
            if worker is not None:
                worker.busy_with.discard(rid)
            if isinstance(message, ErrorReply) and message.code == NotReady.code and not flight.cancelled:
                flight.worker = None  # the worker's state changed under us: queue it again, first
                self._queues[flight.request.model].appendleft(rid)
                self._dispatch(flight.request.model)
                return
            if (
                isinstance(message, ErrorReply)
                and message.code == EngineFailed.code
                and not flight.cancelled
                and self._engine_died(rid, message.message)
            ):
                return
            if isinstance(message, Finished):
                self.counters.drafted += message.drafted_tokens
                self.counters.accepted += message.accepted_tokens
            self._relay(rid, message)
            self._dispatch(flight.request.model)
        elif not flight.cancelled:
            if isinstance(message, Started):
                message = replace(message, node_id=self.node_id)
            self._relay(rid, message)

    def _relay(self, rid: str, message: Message) -> None:
        """Pass an engine's event to the client, keeping a resumed stream seamless: one `Started`,
        token counts of the whole completion."""
        flight = self._flights[rid]
        if isinstance(message, Started):
            if flight.started:
                return  # a resumed request: the client had its `Started`
            flight.started, flight.prompt_tokens = True, message.prompt_tokens
        elif isinstance(message, Chunk):
            flight.sent_ids += message.tokens
            flight.sent_tokens += message.n_tokens
        elif isinstance(message, Finished):
            message = replace(
                message,
                prompt_tokens=flight.prompt_tokens,
                completion_tokens=flight.base_tokens + message.completion_tokens,
            )
        if isinstance(message, TERMINAL_TYPES):
            self._end(rid, message)
        else:
            self._to_client(rid, message)

    def _dispatch(self, model: str) -> None:
        queue = self._queues.get(model)
        while queue:
            # The worker with the most room, so that load spreads over workers.
            retiring = self.retiring
            room, idle = max(
                (
                    (w.room, i)
                    for i, w in self._workers.items()
                    if w.state.model_id == model and i not in retiring
                ),
                default=(0, b""),
            )
            if room <= 0:
                return
            rid = queue.popleft()
            flight = self._flights[rid]
            flight.worker = idle
            self._workers[idle].busy_with.add(rid)
            self._to_worker(idle, flight.request)

    def _fail_queue(self, model: str, why: str) -> None:
        for rid in list(self._queues.get(model, ())):
            self._queues[model].remove(rid)
            self._end(
                rid,
                ErrorReply(request_id=rid, code=EngineFailed.code, message=f"model failed to load: {why}"),
            )

    # -- peers ------------------------------------------------------------------------------

    def _serves_here(self, model: str) -> bool:
        if self.draining:
            return False
        retiring = self.retiring
        return any(
            w.state.model_id == model and w.state.state != "failed" and i not in retiring
            for i, w in self._workers.items()
        )

    def _candidates(self, flight: Flight) -> list[str]:
        """The nodes that may take a flight now: peers (`_remote_nodes`), then this node."""
        here = self.node_id not in flight.tried and self._serves_here(flight.request.model)
        return self._remote_nodes(flight.request, flight.tried) + ([self.node_id] if here else [])

    def _remote_nodes(self, request: Generate, tried: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Peers that may take `request`, but those in `tried`: the near ones serving its model;
        if neither they nor this node can, the far ones (a far node proxies to the mesh, DESIGN
        §2.5; and a far replica beats failing a request). None for a request another router
        already placed."""
        if request.forwarded:
            return []
        here = self.node_id not in tried and self._serves_here(request.model)
        return self.peers.serving(request.model, tried, here=here)

    def _on_mesh_view(self, view: MeshView) -> None:
        """The gossip actor's latest picture: drop links to peers gone, fail over their requests."""
        self.peers.update(view, self.clock())
        live = self.peers.live
        for node in list(self._links):
            if node not in live:
                self.forget(self._monitors.pop(node))
                self.forget(self._links.pop(node))
        for rid, flight in list(self._flights.items()):
            if flight.remote is not None and flight.remote not in live:
                why = f"node {flight.remote} left the mesh or is no longer reachable"
                self._guarded(rid, lambda rid=rid, why=why: self._remote_failed(rid, why))  # type: ignore[misc]
        self._place_held()

    def _forward(self, rid: str, node: str) -> None:
        flight = self._flights[rid]
        flight.remote, flight.remote_heard = node, self.clock()
        flight.tried.add(node)
        self._to_peer(node, replace(flight.request, forwarded=True, api_key=self._forward_key))

    def _from_peer(self, node: str, frames: list[bytes]) -> None:
        message = self.decode(frames[-1], f"peer {node}")
        rid = getattr(message, "request_id", None)
        if not isinstance(rid, str):
            return
        flight = self._flights.get(rid)
        if flight is None or flight.remote != node:
            return  # late news of a request cancelled or moved elsewhere
        flight.remote_heard = self.clock()
        if isinstance(message, Accepted | Pending):
            return  # the client heard ours already
        if isinstance(message, ErrorReply) and message.code == Overloaded.code and not flight.started:
            self._guarded(rid, lambda: self._peer_busy(rid, node))
            return
        if isinstance(message, ErrorReply) and message.code in _RETRYABLE:
            self._guarded(rid, lambda: self._remote_failed(rid, message.message))
            return
        self._guarded(rid, lambda: self._relay(rid, message))

    def _peer_busy(self, rid: str, node: str) -> None:
        """A peer had no room after all (we placed by its load of a heartbeat ago): it is busy,
        not broken. Wait here for room on any node of the request (a 429 only if our own wait
        queue is full), not on that peer again for `busy_backoff_s`."""
        flight = self._flights[rid]
        flight.remote = None
        flight.tried.discard(node)
        flight.not_before = self.clock() + self.config.busy_backoff_s
        self.peers.ended(node, self.clock())
        self._hold(rid)

    def _remote_failed(self, rid: str, why: str) -> None:
        """A peer failed a forwarded request: place it again — from the start if the client saw
        nothing yet, else resuming after the text it already has (same id, same seed)."""
        flight = self._flights[rid]
        log.warning("request %s on %s failed: %s", rid, flight.remote, why)
        flight.remote = None
        flight.grace_until = self.clock() + self.config.suspect_after_s
        if self._prepare_resume(rid):
            self._place(rid, why)

    def _engine_died(self, rid: str, why: str) -> bool:
        """A local engine died under a request (a crash, or a dense split re-forming): place it
        again, resuming after what the client has — on a peer serving its model if there is one,
        else here once the engine is back. False (the request fails) past `max_resumes`, or
        when no engine here will serve its model again."""
        flight = self._flights[rid]
        model = flight.request.model
        if flight.resumes >= self.config.max_resumes or not self._serves_here(model):
            return False
        flight.resumes += 1
        flight.worker = None
        log.warning("request %s: its engine died (%s); placing it again", rid, why)
        if not self._prepare_resume(rid):
            return True
        if self._remote_nodes(flight.request, flight.tried):
            self._place(rid, why)
        else:
            self._queues.setdefault(model, deque()).appendleft(rid)
            self._dispatch(model)
        return True

    def _prepare_resume(self, rid: str) -> bool:
        """Make a failed flight's request continue after the tokens its client has; False if it
        had all it asked for (then it has been finished)."""
        flight = self._flights[rid]
        if not flight.started:
            self.counters.retried += 1
            return True
        self.counters.resumed += 1
        request = flight.request
        # Its max_tokens counts from the last resume on: take off what was sent since.
        left = (
            None
            if request.max_tokens is None
            else request.max_tokens - (flight.sent_tokens - flight.base_tokens)
        )
        flight.request = replace(request, resume_tokens=list(flight.sent_ids), max_tokens=left)
        flight.base_tokens = flight.sent_tokens
        if left is not None and left < 1:
            self._relay(
                rid, Finished(request_id=rid, finish_reason="length", prompt_tokens=0, completion_tokens=0)
            )
            return False
        return True

    def _peer_disconnected(self, node: str) -> None:
        for rid, flight in list(self._flights.items()):
            if flight.remote == node:
                why = f"lost the connection to node {node}"
                self._guarded(rid, lambda rid=rid, why=why: self._remote_failed(rid, why))  # type: ignore[misc]

    def _to_peer(self, node: str, message: Message) -> None:
        link = self._links.get(node)
        if link is None:
            peer = self.peers.live[node]
            link = self.dial(
                zmq.DEALER, f"tcp://{peer.host}:{(peer.zmq_port or 0) + ROUTER_PORT_OFFSET}", node
            )
            if link is None:
                self._peer_disconnected(node)
                return
            self.on_socket(link, lambda frames, node=node: self._from_peer(node, frames))  # type: ignore[misc]
            # A peer process that dies closes its TCP connections at once: hear of it at once.
            monitor = self.adopt(link.get_monitor_socket(zmq.EVENT_DISCONNECTED))
            self.on_socket(monitor, lambda frames, node=node: self._peer_disconnected(node))  # type: ignore[misc]
            self._links[node] = link
            self._monitors[node] = monitor
        try:
            link.send(encode(message), zmq.NOBLOCK)
        except zmq.ZMQError as err:
            self.warn_once(f"peer-send:{node}", "router: cannot send to %s: %s", node, err)

    # -- sending ------------------------------------------------------------------------------

    def _end(self, rid: str, message: Message) -> None:
        """The last word on a request: count its outcome, tell its client, forget it."""
        flight = self._flights.get(rid)
        if flight is not None and not flight.cancelled:  # a cancelled one was counted already
            if isinstance(message, Finished):
                self.counters.completed += 1
            elif isinstance(message, ErrorReply) and message.code == Overloaded.code:
                self.counters.rejected_overload += 1
                if flight.remote is None:  # decided here (a peer counts the 429s it decides)
                    self.meter.refused(self.clock(), flight.request.model)
            else:
                self.counters.failed += 1
            self._to_client(rid, message)
        self._flights.pop(rid, None)
        if flight is not None and flight.remote is not None:
            self.peers.ended(flight.remote, self.clock())
        if self._held and rid not in self._held:
            self._place_held()

    def _to_client(self, rid: str, message: Message) -> None:
        flight = self._flights[rid]
        flight.last_sent = self.clock()
        if not self._send(flight.client, message) and not isinstance(message, TERMINAL_TYPES):
            self._cancel(rid)  # the client's socket is gone: stop generating for nobody

    def _send(self, client: Client, message: Message) -> bool:
        try:
            client.sock.send_multipart([client.identity, encode(message)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as err:  # EHOSTUNREACH (client gone) or EAGAIN (client not reading)
            self.warn_once("client-send", "router: cannot reach a client: %s", err)
            return False

    def _to_worker(self, identity: bytes, message: Message) -> None:
        assert self._back is not None
        try:
            self._back.send_multipart([identity, encode(message)], zmq.NOBLOCK)
        except zmq.ZMQError as err:
            log.error("router: cannot reach worker %r: %s", identity, err)

    # -- snapshots ----------------------------------------------------------------------------

    def _local_ids(self, ready: bool = False) -> set[str]:
        """Ids of the models our workers serve (are ready to serve), and their aliases."""
        if ready and self.draining:
            return set()  # nothing to advertise: peers stop sending us work
        retiring = self.retiring
        ids = {
            w.state.model_id
            for i, w in self._workers.items()
            if not ready or (w.state.state == "ready" and i not in retiring)
        }
        return ids | {alias for alias, model in self.aliases.items() if model in ids}

    def models(self) -> set[str]:
        """Models this node or a live peer serves (their aliases here included)."""
        return self._local_ids() | self.peers.models()

    def snapshot(self, what: str) -> dict[str, object]:
        """Plain data for `Query(what)`: "models", "health" or "status"."""
        local_ready = self._local_ids(ready=True)
        ready = sorted(local_ready | self.peers.models())
        if what == "models":
            return {"models": sorted(self.models()), "ready": ready}
        if what == "health":
            return {"ready": bool(ready), "models": ready}
        workers = [w.snapshot(i.decode()) for i, w in sorted(self._workers.items())]
        return {
            "models": sorted(self.models()),
            "ready": ready,
            "local_models": sorted({w.state.model_id for w in self._workers.values()}),
            "local_ready": sorted(local_ready),
            "workers": workers,
            "queues": {m: len(q) for m, q in self._queues.items()},
            "demand": {
                m: {"waiting": d.waiting, "rejected_per_s": d.rejected_per_s}
                for m, d in self.demand().items()
            },
            "draining": self.draining,
            "in_flight": sum(1 for f in self._flights.values() if f.worker is not None),
            **self.counters.snapshot(in_flight=len(self._flights)),
            "dropped_frames": self.stats["dropped_frames"],
            "actor_stats": {
                self.name: dict(self.stats),
                **{i.decode(): w.state.stats for i, w in sorted(self._workers.items())},
            },
        }

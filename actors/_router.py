"""The router actor: admission, queueing and forwarding of requests to shard-workers.

Frontend: a ROUTER socket that gateways (and the control actor) talk to with DEALER sockets.
Backend: a ROUTER socket on inproc that shard-workers connect to. Each model has a bounded FIFO;
a worker takes up to its `slots` requests at once; events flow back to whoever asked, as they come.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import zmq

from actors._codec import Message, encode
from actors._messages import (
    TERMINAL_TYPES,
    Accepted,
    Answer,
    Cancel,
    ErrorReply,
    Generate,
    Pending,
    Query,
    WorkerState,
)
from actors._runtime import Actor

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Worker:
    state: WorkerState
    busy_with: set[str] = field(default_factory=set)

    @property
    def room(self) -> int:
        """How many more requests the worker takes now."""
        return self.state.slots - len(self.busy_with) if self.state.state == "ready" else 0


@dataclass(slots=True)
class _Flight:
    """A request the router answers for: who asked, which worker has it (None while queued)."""

    client: bytes
    request: Generate
    worker: bytes | None = None
    last_sent: float = 0.0
    cancelled: bool = False


@dataclass(slots=True)
class _Counters:
    admitted: int = 0
    rejected_overload: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0


class Router(Actor):
    """Admits requests per model, forwards them to idle workers and streams answers back."""

    def __init__(
        self,
        ctx: zmq.Context,
        *,
        node_id: str,
        frontend_endpoints: list[str],
        backend_endpoint: str,
        **kwargs: object,
    ) -> None:
        super().__init__(ctx, "router", **kwargs)  # type: ignore[arg-type]
        self.node_id = node_id
        self.frontend_endpoints = frontend_endpoints
        self.backend_endpoint = backend_endpoint
        self.counters = _Counters()
        self._workers: dict[bytes, _Worker] = {}
        self._queues: dict[str, deque[str]] = {}
        self._flights: dict[str, _Flight] = {}
        self._front: zmq.Socket | None = None
        self._back: zmq.Socket | None = None

    def setup(self) -> None:
        self._front = self.socket(zmq.ROUTER)
        for endpoint in self.frontend_endpoints:
            self._front.bind(endpoint)
        self._back = self.socket(zmq.ROUTER)
        self._back.bind(self.backend_endpoint)
        self.on_socket(self._front, self._from_client)
        self.on_socket(self._back, self._from_worker)

    def teardown(self) -> None:
        for rid in list(self._flights):
            self._finish(
                rid, ErrorReply(request_id=rid, code="engine_failed", message="the node is shutting down")
            )

    def on_tick(self, now: float) -> None:
        for rid, flight in list(self._flights.items()):
            if not flight.cancelled and now - flight.last_sent >= self.config.keepalive_interval_s:
                self._to_client(rid, Pending(request_id=rid))

    # -- clients ------------------------------------------------------------------------------

    def _from_client(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.stats["dropped_frames"] += 1
            return
        client, frame = frames
        message = self.decode(frame, "client")
        if isinstance(message, Generate):
            self._admit(client, message)
        elif isinstance(message, Cancel):
            flight = self._flights.get(message.request_id)
            if flight is not None and flight.client == client:  # only whoever asked may cancel
                self._cancel(message.request_id)
        elif isinstance(message, Query):
            self._reply(client, Answer(request_id=message.request_id, data=self.snapshot(message.what)))

    def _admit(self, client: bytes, request: Generate) -> None:
        rid = request.request_id
        workers = [w for w in self._workers.values() if w.state.model_id == request.model]
        error = None
        if rid in self._flights:
            error = ErrorReply(request_id=rid, code="invalid_request", message=f"duplicate request id {rid}")
        elif not workers:
            served = ", ".join(sorted(self.models())) or "none"
            error = ErrorReply(
                request_id=rid,
                code="model_not_found",
                message=f"The model '{request.model}' does not exist on this mesh (served: {served})",
                details={"param": "model"},
            )
        elif all(w.state.state == "failed" for w in workers):
            error = ErrorReply(
                request_id=rid,
                code="engine_failed",
                message=f"model failed to load: {workers[0].state.detail}",
            )
        elif len(self._queues.setdefault(request.model, deque())) >= self.config.queue_depth_per_model:
            self.counters.rejected_overload += 1
            error = ErrorReply(
                request_id=rid,
                code="overloaded",
                message=f"the queue for {request.model} is full "
                f"({self.config.queue_depth_per_model} waiting)",
                details={"retry_after": self.config.retry_after_s},
            )
        if error is not None:
            self._reply(client, error)
            return
        self.counters.admitted += 1
        self._flights[rid] = _Flight(client=client, request=request, last_sent=self.clock())
        self._reply(client, Accepted(request_id=rid, node_id=self.node_id))
        self._queues[request.model].append(rid)
        self._dispatch(request.model)

    def _cancel(self, rid: str) -> None:
        flight = self._flights.get(rid)
        if flight is None or flight.cancelled:
            return
        self.counters.cancelled += 1
        if flight.worker is None:
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
            worker = self._workers.setdefault(identity, _Worker(state=message))
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
            if isinstance(message, ErrorReply) and message.code == "not_ready" and not flight.cancelled:
                flight.worker = None  # the worker's state changed under us: queue it again, first
                self._queues[flight.request.model].appendleft(rid)
                self._dispatch(flight.request.model)
                return
            if isinstance(message, ErrorReply):
                self.counters.failed += 1
            else:
                self.counters.completed += 1
            self._finish(rid, message)
            self._dispatch(flight.request.model)
        elif not flight.cancelled:
            self._to_client(rid, message)

    def _dispatch(self, model: str) -> None:
        queue = self._queues.get(model)
        while queue:
            # The worker with the most room, so that load spreads over workers.
            room, idle = max(
                ((w.room, i) for i, w in self._workers.items() if w.state.model_id == model), default=(0, b"")
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
            self._finish(
                rid, ErrorReply(request_id=rid, code="engine_failed", message=f"model failed to load: {why}")
            )

    # -- sending ------------------------------------------------------------------------------

    def _finish(self, rid: str, message: Message) -> None:
        flight = self._flights.get(rid)
        if flight is not None and not flight.cancelled:
            self._to_client(rid, message)
        self._flights.pop(rid, None)

    def _to_client(self, rid: str, message: Message) -> None:
        flight = self._flights[rid]
        flight.last_sent = self.clock()
        if not self._reply(flight.client, message) and not isinstance(message, TERMINAL_TYPES):
            self._cancel(rid)  # the client's socket is gone: stop generating for nobody

    def _reply(self, client: bytes, message: Message) -> bool:
        assert self._front is not None
        try:
            self._front.send_multipart([client, encode(message)], zmq.NOBLOCK)
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

    def models(self) -> set[str]:
        return {w.state.model_id for w in self._workers.values()}

    def snapshot(self, what: str) -> dict[str, object]:
        """Plain data for `Query(what)`: "models", "health" or "status"."""
        ready = sorted({w.state.model_id for w in self._workers.values() if w.state.state == "ready"})
        if what == "models":
            return {"models": sorted(self.models()), "ready": ready}
        if what == "health":
            return {"ready": bool(ready), "models": ready}
        workers = [
            {
                "worker_id": i.decode(),
                "model": w.state.model_id,
                "state": w.state.state,
                "engine_pid": w.state.engine_pid,
                "restarts": w.state.restarts,
                "n_ctx": w.state.n_ctx,
                "busy": bool(w.busy_with),
                "active": len(w.busy_with),
                "slots": w.state.slots,
                "detail": w.state.detail,
            }
            for i, w in sorted(self._workers.items())
        ]
        return {
            "models": sorted(self.models()),
            "ready": ready,
            "workers": workers,
            "queues": {m: len(q) for m, q in self._queues.items()},
            "in_flight": sum(1 for f in self._flights.values() if f.worker is not None),
            "requests": {
                "admitted": self.counters.admitted,
                "completed": self.counters.completed,
                "failed": self.counters.failed,
                "cancelled": self.counters.cancelled,
                "rejected_overload": self.counters.rejected_overload,
            },
            "dropped_frames": self.stats["dropped_frames"],
        }

"""A node: one ZeroMQ context and its actors (router, shard-workers, control), started and
stopped in order. The HTTP gateway runs in other processes and reaches the router over TCP.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import zmq

from actors._config import CONTROL_PORT_OFFSET, ROUTER_PORT_OFFSET, NodeConfig
from actors.node._control import Control
from actors.routing._router import Router
from actors.runtime._actor import Actor
from actors.shard._worker import ShardWorker
from actors.wire._messages import EngineSpec

log = logging.getLogger(__name__)
ActorFactory = Callable[["Node"], Actor]
VERSION = "0.1.0"


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """One model this node serves: where it loads from and the id clients ask for."""

    source: str  # a GGUF path, or `fake:...` in tests
    model_id: str
    draft: str | None = None  # a draft GGUF for speculative decoding
    speculative: str = ""  # the drafter requests get by default: "draft", "lookup" or "" (none)


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeSpec:
    node_id: str
    mesh: str = "default"
    host: str = "127.0.0.1"
    http_port: int = 9337
    zmq_port: int = 9338
    models: list[ModelSpec] = field(default_factory=list)
    n_ctx: int = 4096
    n_threads: int = 2
    slots: int = 1  # requests each engine serves at once (continuous batching)
    role: str = "serving"
    config: NodeConfig = field(default_factory=NodeConfig)

    def engine_spec(self, model: ModelSpec) -> EngineSpec:
        """What the engine child serving `model` on this node needs."""
        return EngineSpec(
            model=model.source,
            model_id=model.model_id,
            n_ctx=self.n_ctx,
            n_threads=self.n_threads,
            slots=self.slots,
            draft=model.draft,
            speculative=model.speculative,
        )

    @property
    def control_endpoint(self) -> str:
        return f"tcp://{self.host}:{self.zmq_port + CONTROL_PORT_OFFSET}"

    @property
    def router_endpoint(self) -> str:
        return f"tcp://{self.host}:{self.zmq_port + ROUTER_PORT_OFFSET}"


class Node:
    """Owns the context and the actors of one node. `start()` raises if any actor fails to."""

    def __init__(
        self,
        spec: NodeSpec,
        *,
        more: Sequence[ActorFactory] = (),
        peers_endpoint: str | None = None,
        inbox_endpoint: str | None = None,
    ) -> None:
        """`more` makes actors of other rooms (gossip) on this node's context; they start after the
        workers. The control actor asks `peers_endpoint` for the mesh's peers and passes the
        hellos of joining nodes to `inbox_endpoint`."""
        self.spec = spec
        self.ctx = zmq.Context()
        local = self.router_local_endpoint
        backend = f"inproc://router-backend-{spec.node_id}"
        kw = {"config": spec.config}
        self.router = Router(
            self.ctx,
            node_id=spec.node_id,
            frontend_endpoints=[spec.router_endpoint],
            backend_endpoint=backend,
            inside_endpoint=local,
            **kw,
        )
        self._backend = backend
        self._worker_ids = itertools.count()
        self.workers = [self._make_worker(m) for m in spec.models]
        info = {
            "node_id": spec.node_id,
            "mesh": spec.mesh,
            "role": spec.role,
            "host": spec.host,
            "http_port": spec.http_port,
            "zmq_port": spec.zmq_port,
            "version": VERSION,
        }
        self.more = [make(self) for make in more]
        self.control = Control(
            self.ctx,
            endpoint=spec.control_endpoint,
            router_endpoint=local,
            node_info=info,
            peers_endpoint=peers_endpoint,
            inbox_endpoint=inbox_endpoint,
            config=spec.config,
        )
        self._started: list[Actor] = []

    def _make_worker(self, model: ModelSpec) -> ShardWorker:
        spec = self.spec.engine_spec(model)
        worker_id = f"worker-{next(self._worker_ids)}"
        return ShardWorker(
            self.ctx, worker_id, spec=spec, router_endpoint=self._backend, config=self.spec.config
        )

    def add_worker(self, model: ModelSpec) -> ShardWorker:
        """Start one more shard-worker on a running node (it loads, then takes requests); call from
        the thread that owns the node."""
        worker = self._make_worker(model)
        worker.start()
        self.workers.append(worker)
        self._started.insert(1, worker)  # stopped after the others, before the router
        return worker

    def retire_worker(self, worker_id: str) -> None:
        """Stop a shard-worker on a running node: the requests it holds fail (`engine_failed`), the
        router forgets it; call from the thread that owns the node."""
        worker = next(w for w in self.workers if w.worker_id == worker_id)
        worker.stop()
        self.workers.remove(worker)
        if worker in self._started:
            self._started.remove(worker)

    @property
    def router_local_endpoint(self) -> str:
        """The router's in-process endpoint, for the node's own actors."""
        return f"inproc://router-{self.spec.node_id}"

    def start(self) -> Node:
        try:
            for actor in (self.router, *self.workers, *self.more, self.control):
                actor.start()
                self._started.append(actor)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop actors in reverse order, then the context; idempotent."""
        while self._started:
            self._started.pop().stop()
        if not self.ctx.closed:
            self.ctx.term()

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""A node: one ZeroMQ context and its actors (router, shard-workers, dense-split heads, the
stage host, control), started and stopped in order. The HTTP gateway runs in other processes and
reaches the router over TCP.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from actors._config import CONTROL_PORT_OFFSET, ROUTER_PORT_OFFSET, TUNNEL_PORT_OFFSET, NodeConfig
from actors.engine._llamacpp import has_file_tensors
from actors.node._control import Control
from actors.routing._router import Router
from actors.runtime._actor import Actor
from actors.shard._worker import ShardWorker
from actors.wire._curve import Keyring, secure, unsecure
from actors.wire._messages import EngineSpec, SplitLoad

if TYPE_CHECKING:
    from actors.gguf._layout import Layout

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
    layout: Layout | None = None  # a dense GGUF's layers and identity: it may be split
    aliases: tuple[str, ...] = ()  # other names clients may ask for it by (--alias)


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
    stream_interval_ms: float = 0.0  # a stream's later tokens go at most this often (see engine._outbox)
    role: str = "serving"
    config: NodeConfig = field(default_factory=NodeConfig)
    # Dense splits: what this node offers them (--max-memory), the GGUFs it holds for them, whether
    # its models split even when they fit (--split), how stages load, where cache files go.
    max_memory_bytes: int = 0
    holdings: list[Layout] = field(default_factory=list)
    split: bool = False
    split_load: SplitLoad = "auto"
    work_dir: Path | None = None
    # The node's own HTTP gateway reaches its router here (ipc), not through the LAN-facing port;
    # requests from the network must carry one of `api_keys` unless the mesh is secured.
    gateway_endpoint: str | None = None
    api_keys: frozenset[str] = frozenset()

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
            stream_interval_ms=self.stream_interval_ms,
        )

    @property
    def control_endpoint(self) -> str:
        return f"tcp://{self.host}:{self.zmq_port + CONTROL_PORT_OFFSET}"

    @property
    def router_endpoint(self) -> str:
        return f"tcp://{self.host}:{self.zmq_port + ROUTER_PORT_OFFSET}"

    @property
    def tunnel_endpoint(self) -> str:
        return f"tcp://{self.host}:{self.zmq_port + TUNNEL_PORT_OFFSET}"

    def needs_split(self, model: ModelSpec) -> bool:
        """Whether `model` is served as a dense split headed here: --split, or too big for what
        this node offers."""
        if model.layout is None:
            return False
        return self.split or _need(self, model) > self.max_memory_bytes


class Node:
    """Owns the context and the actors of one node. `start()` raises if any actor fails to."""

    def __init__(
        self,
        spec: NodeSpec,
        *,
        more: Sequence[ActorFactory] = (),
        peers_endpoint: str | None = None,
        inbox_endpoint: str | None = None,
        operations: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None,
        keyring: Keyring | None = None,
        trust: Callable[[str, dict[str, Any], str | None], dict[str, Any]] | None = None,
    ) -> None:
        """`more` makes actors of other rooms (gossip) on this node's context; they start after the
        workers. The control actor asks `peers_endpoint` for the mesh's peers and passes the
        hellos of joining nodes to `inbox_endpoint`; `operations` takes mesh-ctl's commands that
        change the node (drain, promote, swap). With a `keyring` the node is secured: every port
        admits the keyring's members only (CURVE, ZAP), and `trust` answers membership commands."""
        self.spec = spec
        self.ctx = zmq.Context()
        self.keyring = keyring
        if keyring is not None:
            secure(self.ctx, keyring)
        local = self.router_local_endpoint
        backend = f"inproc://router-backend-{spec.node_id}"
        kw = {"config": spec.config}
        self.router = Router(
            self.ctx,
            node_id=spec.node_id,
            frontend_endpoints=[spec.router_endpoint],
            backend_endpoint=backend,
            inside_endpoint=local,
            gateway_endpoint=spec.gateway_endpoint,
            api_keys=spec.api_keys,
            aliases={alias: m.model_id for m in spec.models for alias in m.aliases},
            **kw,
        )
        self._backend = backend
        self._worker_ids = itertools.count()
        whole = [m for m in spec.models if not spec.needs_split(m)]
        self.workers = [self._make_worker(m) for m in whole]
        self.view_endpoints: list[str] = []
        self.heads = [
            self._make_head(m, i, inbox_endpoint) for i, m in enumerate(spec.models) if m not in whole
        ]
        used = sum(_need(spec, m) for m in whole if m.layout is not None)
        self.stage = self._make_stage(used if not self.heads else spec.max_memory_bytes, inbox_endpoint)
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
            operations=operations,
            trust=trust,
            config=spec.config,
        )
        self._started: list[Actor] = []

    def _make_worker(self, model: ModelSpec, control: str | None = None) -> ShardWorker:
        spec = self.spec.engine_spec(model)
        worker_id = f"worker-{next(self._worker_ids)}"
        return ShardWorker(
            self.ctx,
            worker_id,
            spec=spec,
            router_endpoint=self._backend,
            control_endpoint=control,
            config=self.spec.config,
            # On the router's thread: each chunk it relays then wakes one thread less. A split's
            # head manages its worker from a thread of its own (it reads the worker's state).
            host=self.router if control is None else None,
        )

    def _make_head(self, model: ModelSpec, index: int, inbox: str | None) -> Actor:
        from actors.splits._head import SplitHead

        assert model.layout is not None
        node = self.spec.node_id
        control = f"inproc://split-worker-{node}-{index}"
        view = f"inproc://split-view-{node}-{index}"
        self.view_endpoints.append(view)
        return SplitHead(
            self.ctx,
            node_id=node,
            spec=self.spec.engine_spec(model),
            layout=model.layout,
            free_bytes=self.spec.max_memory_bytes,
            force=self.spec.split,
            load=self.spec.split_load,
            file_tensors=has_file_tensors(),
            worker=self._make_worker(model, control),
            control_endpoint=control,
            view_endpoint=view,
            news_endpoint=inbox,
            config=self.spec.config,
        )

    def _make_stage(self, used_bytes: int, inbox: str | None) -> Actor:
        from actors.splits._stage import StageHost, rpc_host_for

        spec = self.spec
        work = spec.work_dir or Path(tempfile.gettempdir()) / f"mesh-llm-{spec.node_id}-{os.getpid()}"
        return StageHost(
            self.ctx,
            node_id=spec.node_id,
            endpoint=spec.tunnel_endpoint,
            holdings=spec.holdings,
            memory_bytes=spec.max_memory_bytes,
            used_bytes=used_bytes,
            work_dir=work,
            rpc_host=rpc_host_for(spec.host),
            n_threads=spec.n_threads,
            file_tensors=has_file_tensors(),
            offer_endpoint=inbox,
            config=spec.config,
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
            for actor in (self.router, *self.workers, self.stage, *self.heads, *self.more, self.control):
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
        unsecure(self.ctx)
        if not self.ctx.closed:
            self.ctx.term()

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _need(spec: NodeSpec, model: ModelSpec) -> int:
    """The bytes `model` needs on one node at this node's context size."""
    from actors.splits._plan import need_of

    assert model.layout is not None
    return need_of(model.layout, spec.n_ctx * spec.slots).total

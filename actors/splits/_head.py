"""The split head actor: serves a dense model bigger than its node over stages on other nodes.

It owns the model's (managed) shard-worker and drives it: while the split forms the worker waits
("loading"), the router queueing requests; when the mesh cannot hold the model it fails with the
reason (503s name it) and the head plans again whenever the mesh changes. A plan claims each
stage's lease; once every stage has granted one, the head opens a loopback tunnel port per stage
and hands the worker an `EngineSpec` listing them in layer order (the engine starts while the
stages' RPC servers do: its connections wait in each stage's tunnel until the server listens).

A stage that dies aborts the head's llama.cpp (or would hang it: the tunnel closes the engine's
connections the moment the link drops, and a watchdog re-plans when a stage is suspect and no
token has come for `stall_s`); the head then dissolves the split, plans again with what remains
and the router resumes the streams in flight from their token ids.
"""

from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass, field, replace

import zmq

from actors._config import TUNNEL_PORT_OFFSET
from actors.gguf._layout import Layout
from actors.runtime._actor import Actor
from actors.shard._worker import ShardWorker
from actors.splits._plan import Candidate, Member, NoFit, Plan, need_of, plan_split
from actors.splits._tunnel import HeadEnd, parse_tunnel, unbounded
from actors.wire._codec import encode
from actors.wire._curve import dial
from actors.wire._messages import (
    LOAD_MODES,
    EngineSpec,
    LoadMode,
    MeshView,
    PeerRow,
    SplitLoad,
    SplitNews,
    SplitRow,
    SplitStage,
    SplitStateName,
    StageClaim,
    StageGrant,
    StageRelease,
    WorkerState,
    WorkerStateName,
)

log = logging.getLogger(__name__)
_MAX_FAILED_LOADS = 3  # engine loads failing in a row before the split is held failed
_RETRY_FAILED_S = 30.0  # and then planned again after this


@dataclass(slots=True)
class _Stage:
    member: Member
    link: zmq.Socket
    monitor: zmq.Socket
    mode: LoadMode
    epoch: int = 0
    state: str = "claimed"
    answered_at: float = 0.0
    claimed_at: float = 0.0
    tunnel: HeadEnd | None = None


@dataclass(slots=True)
class _Split:
    plan: Plan
    stages: dict[str, _Stage] = field(default_factory=dict)
    engine_asked: bool = False
    epoch: int = 0  # the split's own epoch: one more at every plan


class SplitHead(Actor):
    def __init__(
        self,
        ctx: zmq.Context,
        *,
        node_id: str,
        spec: EngineSpec,
        layout: Layout,
        free_bytes: int,
        force: bool,
        load: SplitLoad,
        file_tensors: bool,
        worker: ShardWorker,
        control_endpoint: str,
        view_endpoint: str,
        news_endpoint: str | None = None,
        **kwargs: object,
    ) -> None:
        """`spec`: the model as a single node would serve it; `free_bytes`: what this node offers
        it; `force`: split even if it fits (--split); `load`: how stages get their weights (auto: the
        best both ends can); `file_tensors`: this node's llama.cpp has the project's RPC patch (it can
        have stages read tensors from their own files); `worker`: the managed shard-worker it drives
        over `control_endpoint`; `view_endpoint`: where gossip pushes mesh views; `news_endpoint`:
        where gossip takes our `SplitNews` (how `mesh-ctl splits` learns of us)."""
        super().__init__(ctx, f"split-{spec.model_id}", **kwargs)  # type: ignore[arg-type]
        self.node_id = node_id
        self.spec = spec
        self.layout = layout
        self.free_bytes = free_bytes
        self.force = force
        self.load = load
        self.file_tensors = file_tensors
        self.worker = worker
        self.control_endpoint = control_endpoint
        self.view_endpoint = view_endpoint
        self.news_endpoint = news_endpoint
        self.need = need_of(layout, spec.n_ctx * spec.slots)
        self.state: SplitStateName = "planning"
        self.detail = "waiting for peers"
        self.split: _Split | None = None
        self.peers: dict[str, PeerRow] = {}
        self.excluded: dict[str, float] = {}  # node -> until when it is not recruited
        self.bytes_crossed = 0
        self._failed_loads = 0
        self._worker_restarts = 0  # the worker's count of engine exits, as last heard
        self._epochs = itertools.count(1)
        self._plan_at = self._earliest_plan = self._news_due = 0.0
        self._renewed_at = 0.0
        self._control: zmq.Socket | None = None
        self._news: zmq.Socket | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def setup(self) -> None:
        self._control = self.socket(zmq.PAIR)
        self._control.bind(self.control_endpoint)
        self.on_socket(self._control, self._from_worker)
        views = self.socket(zmq.PULL)
        views.bind(self.view_endpoint)
        self.on_socket(views, self._on_view)
        if self.news_endpoint is not None:
            self._news = self.socket(zmq.PUSH)
            self._news.connect(self.news_endpoint)
        self.worker.start()
        self._plan_at = self._earliest_plan = self.clock() + self.config.split_wait_for_peers_s
        self._publish()

    def teardown(self) -> None:
        self._dissolve()
        self.worker.stop()

    def on_tick(self, now: float) -> None:
        if self.state in ("planning", "failed") and now >= self._plan_at:
            self._try_plan()
        if now >= self._news_due:  # the tunnels' counters move: say so now and then
            self._publish()
        split = self.split
        if split is None:
            return
        if now - self._renewed_at >= self.config.lease_renew_s:
            self._renewed_at = now
            for stage in split.stages.values():
                self._claim(split, stage)
        for node, stage in split.stages.items():
            if now - max(stage.answered_at, stage.claimed_at) > self.config.lease_lost_s:
                self._lost(node, f"stage {node} has not answered for {self.config.lease_lost_s:.0f} s")
                return
            peer = self.peers.get(node)
            stalled = self.worker.busy and now - self.worker.last_event_at > self.config.stall_s
            if peer is not None and peer.state == "suspect" and split.engine_asked and stalled:
                self._lost(node, f"stage {node} is suspect and no token came for {self.config.stall_s:.0f} s")
                return

    # -- planning -----------------------------------------------------------------------------

    def _candidates(self) -> list[Candidate]:
        now = self.clock()
        self.excluded = {n: until for n, until in self.excluded.items() if until > now}
        out = []
        for node, peer in self.peers.items():
            offer = peer.offer
            if (
                peer.state != "alive"
                or offer is None
                or self.excluded.get(node, 0.0) > now
                or (offer.stage_for not in ("", self.node_id))
                or not any(h.identity == self.layout.identity for h in offer.holdings)
                or peer.rtt_ms is None
                or peer.rtt_ms > self.config.max_rtt_ms
                or not peer.zmq_port
                or (self.load == "file" and not offer.file_tensors)
            ):
                continue
            out.append(Candidate(node_id=node, free_bytes=offer.free_bytes, rtt_ms=peer.rtt_ms))
        return out

    def _try_plan(self) -> None:
        self._plan_at = self.clock() + 1.0  # at most once a second unless something changes
        result = plan_split(
            self.need, Candidate(self.node_id, self.free_bytes), self._candidates(), force=self.force
        )
        if result is None:  # it fits here after all
            plan = Plan(
                members=(Member(self.node_id, 0, self.layout.n_layer - 1, output=True),), head=self.node_id
            )
            self._start(plan)
        elif isinstance(result, NoFit):
            if self.state != "failed" or self.detail != result.reason:  # news: say it once
                log.warning("split of %s: cannot form: %s", self.spec.model_id, result.reason)
                self._set("failed", result.reason)
                self._hold_worker("failed", result.reason)
        else:
            self._start(result)

    def _start(self, plan: Plan) -> None:
        split = self.split = _Split(plan=plan, epoch=next(self._epochs))
        layout = ", ".join(
            f"{m.node_id}: layers {m.first}-{m.last}{' + output' if m.output else ''}" for m in plan.members
        )
        log.info("split of %s (split epoch %d): %s", self.spec.model_id, split.epoch, layout)
        for member in plan.stages:
            peer = self.peers[member.node_id]
            # A routing id of its own per split: the last split's link may still be closing, and a
            # stage's ROUTER refuses a second connection under an id in use.
            link = unbounded(self.socket(zmq.DEALER, identity=f"{self.node_id}/{split.epoch}".encode()))
            dial(link, f"tcp://{peer.host}:{(peer.zmq_port or 0) + TUNNEL_PORT_OFFSET}", member.node_id)
            monitor = self.adopt(link.get_monitor_socket(zmq.EVENT_DISCONNECTED))
            node = member.node_id
            mode, why = self._load_mode(peer)
            log.info("split of %s: stage %s loads by %s (%s)", self.spec.model_id, node, mode, why)
            stage = _Stage(member=member, link=link, monitor=monitor, mode=mode)
            split.stages[node] = stage
            self.on_socket(link, functools.partial(self._from_stage, node))
            self.on_socket(monitor, functools.partial(self._link_lost, node))
            self._claim(split, stage)
        self._renewed_at = self.clock()
        self._set("loading", f"claiming {len(plan.stages)} stage(s)")
        self._hold_worker("loading", self.detail)
        self._maybe_load()

    def _claim(self, split: _Split, stage: _Stage) -> None:
        m = stage.member
        claim = StageClaim(
            request_id=f"{split.epoch}",
            head=self.node_id,
            identity=self.layout.identity,
            first=m.first,
            last=m.last,
            load_mode=stage.mode,
            epoch=stage.epoch,
        )
        if not stage.claimed_at:
            stage.claimed_at = self.clock()
        try:
            stage.link.send(encode(claim), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # not connected yet: the next renewal tries again

    def _from_stage(self, node: str, frames: list[bytes]) -> None:
        split = self.split
        stage = split.stages.get(node) if split is not None else None
        if split is None or stage is None:
            return
        parsed = parse_tunnel(frames)
        if parsed is not None:
            epoch, conn, op, data = parsed
            if stage.tunnel is not None and epoch == stage.epoch:
                stage.tunnel.from_stage(conn, op, data)
            return
        grant = self.decode(frames[-1], f"stage {node}")
        if not isinstance(grant, StageGrant) or grant.request_id != f"{split.epoch}":
            return
        if grant.state == "refused":
            if not stage.epoch:  # refused a new lease (busy, full, no such file): ask others first
                self.excluded[node] = self.clock() + 5.0
            self._replan(f"stage {node} refused: {grant.detail}")  # a lost lease: it may be claimed again
            return
        if stage.epoch and grant.epoch != stage.epoch:
            self._lost(node, f"stage {node} changed its lease epoch")
            return
        if grant.state == "ready" and stage.state != "ready":
            m = stage.member
            log.info(
                "split of %s: stage %s ready for layers %d-%d (%.1f MB of RPC cache files from its own copy)",
                self.spec.model_id, node, m.first, m.last, grant.cache_bytes / 1e6,
            )  # fmt: skip
        stage.epoch, stage.state, stage.answered_at = grant.epoch, grant.state, self.clock()
        self._maybe_load()

    def _maybe_load(self) -> None:
        split = self.split
        # Once every stage has granted its lease: the engine starts while the stages' RPC servers
        # do (its connections wait in the stage's tunnel until the server listens).
        if split is None or split.engine_asked or any(not s.epoch for s in split.stages.values()):
            return
        devices, files = [], []
        for member in split.plan.members:
            if member.node_id == self.node_id:
                devices.append("cpu")
                files.append("")
                continue
            stage = split.stages[member.node_id]
            stage.tunnel = HeadEnd(self, stage.epoch, stage.link.send_multipart)
            devices.append(stage.tunnel.endpoint)
            files.append(self.layout.identity if stage.mode == "file" else "")
        spec = replace(
            self.spec,
            devices=devices if split.plan.stages else [],
            tensor_split=split.plan.tensor_split(),
            device_files=files if split.plan.stages else [],
        )
        split.engine_asked = True
        self._set("loading", "the head's engine loads the model over its stages")
        self._tell_worker(spec)

    def _load_mode(self, peer: PeerRow) -> tuple[LoadMode, str]:
        """How the stage on `peer` gets its weights, and why."""
        if self.load != "auto":
            return self.load, "--split-load"
        if not self.file_tensors:
            return "hash-cache", "this node's llama.cpp lacks the project's RPC patch"
        if peer.offer is None or not peer.offer.file_tensors:
            return "hash-cache", "the stage's llama.cpp lacks the project's RPC patch"
        return "file", f"both ends have the RPC patch and the stage holds GGUF {self.layout.identity}"

    # -- the worker and the mesh --------------------------------------------------------------

    def _from_worker(self, frames: list[bytes]) -> None:
        news = self.decode(frames[-1], "worker")
        if not isinstance(news, WorkerState):
            return
        died = news.restarts > self._worker_restarts  # an engine exit (not one we ordered)
        self._worker_restarts = news.restarts
        split = self.split
        if split is None or not split.engine_asked:
            return
        if news.state == "ready" and self.state != "serving":
            self.bytes_crossed = sum(s.tunnel.bytes_up for s in split.stages.values() if s.tunnel is not None)
            weights = sum(
                sum(self.layout.layer_bytes[s.member.first : s.member.last + 1])
                for s in split.stages.values()
            )
            log.info(
                "split of %s serving: %d stage(s); %.1f MB crossed to stages holding %.1f MB of weights",
                self.spec.model_id, len(split.stages), self.bytes_crossed / 1e6, weights / 1e6,
            )  # fmt: skip
            self._failed_loads = 0
            self._set("serving", "")
        elif died:
            if self.state != "serving":
                self._failed_loads += 1
            if self._failed_loads >= _MAX_FAILED_LOADS:  # it will not load like this: no crash loop
                why = f"the head's engine failed to load the split {self._failed_loads} times ({news.detail})"
                log.error("split of %s: %s; trying again in %.0f s", self.spec.model_id, why, _RETRY_FAILED_S)
                self._dissolve()
                self._set("failed", why)
                self._hold_worker("failed", why)
                self._failed_loads = 0
                self._plan_at = self._earliest_plan = self.clock() + _RETRY_FAILED_S
            else:
                self._replan(f"the head's engine died ({news.detail})")

    def _on_view(self, frames: list[bytes]) -> None:
        view = self.decode(frames[-1], "gossip")
        if not isinstance(view, MeshView):
            return
        self.peers = {p.node_id: p for p in view.peers}
        split = self.split
        if split is not None:
            for node in split.stages:
                peer = self.peers.get(node)
                if peer is None or peer.state in ("dead", "left"):
                    self._lost(node, f"stage {node} is {peer.state if peer else 'gone'}")
                    return
        if self.state in ("planning", "failed"):  # the mesh changed: plan again soon
            self._plan_at = max(self._earliest_plan, min(self._plan_at, self.clock() + 0.2))

    def _link_lost(self, node: str, frames: list[bytes]) -> None:
        self._lost(node, f"lost the link to stage {node}")

    def _lost(self, node: str, why: str) -> None:
        if self.split is None or node not in self.split.stages:
            return
        self.excluded[node] = max(self.excluded.get(node, 0.0), self.clock() + self.config.dead_after_s)
        self._replan(why)

    def _replan(self, why: str) -> None:
        log.warning("split of %s: %s; planning again", self.spec.model_id, why)
        self._dissolve()
        self._set("planning", why)
        self._hold_worker("loading", f"re-forming the split: {why}")
        self._plan_at = self.clock()

    def _dissolve(self) -> None:
        split, self.split = self.split, None
        if split is None:
            return
        for stage in split.stages.values():
            if stage.tunnel is not None:
                stage.tunnel.close()
            if stage.epoch:
                try:
                    stage.link.send(encode(StageRelease(head=self.node_id, epoch=stage.epoch)), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            self.forget(stage.monitor)
            stage.link.setsockopt(zmq.LINGER, 200)
            self.forget(stage.link)

    def _hold_worker(self, state: WorkerStateName, detail: str) -> None:
        """Have the worker wait without an engine ("loading") or fail its requests ("failed")."""
        self._tell_worker(WorkerState(worker_id="", model_id=self.spec.model_id, state=state, detail=detail))

    def _tell_worker(self, message: EngineSpec | WorkerState) -> None:
        assert self._control is not None
        try:
            self._control.send(encode(message), zmq.NOBLOCK)
        except zmq.Again:
            log.error("split of %s: the worker does not take orders", self.spec.model_id)

    # -- status -------------------------------------------------------------------------------

    def _set(self, state: SplitStateName, detail: str) -> None:
        self.state, self.detail = state, detail
        self._publish()

    def row(self) -> SplitRow:
        split = self.split
        members = split.plan.members if split is not None else ()
        epochs = [s.epoch for s in split.stages.values()] if split is not None else []
        tunnels = (
            [s.tunnel for s in split.stages.values() if s.tunnel is not None] if split is not None else []
        )
        return SplitRow(
            model=self.spec.model_id,
            head=self.node_id,
            epoch=max(epochs, default=split.epoch if split is not None else 0),
            state=self.state,
            load_mode=self._split_mode(),
            stages=[
                SplitStage(
                    node_id=m.node_id,
                    layers=[m.first, m.last] if m.n_layers else [],
                    output=m.output,
                    load_mode=split.stages[m.node_id].mode
                    if split is not None and m.node_id in split.stages
                    else None,
                )
                for m in members
                if m.n_layers or m.output
            ],
            detail=self.detail,
            bytes_crossed=self.bytes_crossed,
            tunnel_bytes_up=sum(t.bytes_up for t in tunnels) - self.bytes_crossed,
            tunnel_bytes_down=sum(t.bytes_down for t in tunnels),
            round_trips=sum(t.round_trips for t in tunnels),
        )

    def _split_mode(self) -> LoadMode:
        """The split's load mode: its stages' weakest; before it has stages, what they would get
        from this end."""
        split = self.split
        if split is not None and split.stages:
            return max((s.mode for s in split.stages.values()), key=LOAD_MODES.index)
        if self.load != "auto":
            return self.load
        return "file" if self.file_tensors else "hash-cache"

    def _publish(self) -> None:
        self._news_due = self.clock() + 1.0
        if self._news is not None:
            try:
                self._news.send(encode(SplitNews(splits=[self.row()])), zmq.NOBLOCK)
            except zmq.Again:
                pass  # the gossip actor is gone (the node stops) or not up yet

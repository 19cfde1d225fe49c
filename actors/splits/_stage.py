"""The stage host actor: serves layers of a GGUF it holds to one split head at a time.

It binds the node's tunnel port (zmq_port + 3). A head claims a stage with `StageClaim`; the
stage grants a lease with a fresh epoch (higher than any it granted before, across restarts),
starts its RPC server child (which first builds the hash-cache files of its layers from its own
copy of the model) and answers every renewal with its state. Another head is refused while the
lease lives; tunnel frames of any other epoch are dropped (fenced) and counted; a lease its head
stops renewing expires, and the child and its cache files go with it. It also tells the gossip
actor what this node offers splits (`Offer`).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from actors.gguf._layout import Layout
from actors.runtime._actor import Actor
from actors.runtime._supervisor import ChildProcess
from actors.splits._plan import OVERHEAD_BYTES
from actors.splits._tunnel import CLOSE, StageEnd, parse_tunnel, tunnel_frames, unbounded
from actors.wire._codec import encode
from actors.wire._messages import Holding, Offer, StageClaim, StageGrant, StageRelease, StageStateName

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Lease:
    head: str
    zid: bytes  # the head's routing id on our tunnel socket
    epoch: int
    claim: StageClaim
    bytes: int
    renewed_at: float
    cache_dir: Path
    rpc_endpoint: str
    child: ChildProcess
    state: StageStateName = "loading"
    detail: str = ""
    tunnel: StageEnd | None = None
    cache_bytes: int = 0
    started_at: float = field(default_factory=time.monotonic)


class StageHost(Actor):
    def __init__(
        self,
        ctx: zmq.Context,
        *,
        node_id: str,
        endpoint: str,
        holdings: list[Layout],
        memory_bytes: int,
        used_bytes: int,
        work_dir: Path,
        rpc_host: str,
        n_threads: int,
        file_tensors: bool = False,
        offer_endpoint: str | None = None,
        **kwargs: object,
    ) -> None:
        """`endpoint`: the tunnel port to bind; `holdings`: the GGUFs this node may serve layers
        of; `memory_bytes`: what it offers (--max-memory), `used_bytes` of it taken by its own
        models; `work_dir`: where cache files live while a lease does; `rpc_host`: the loopback
        address the RPC server listens on; `file_tensors`: its llama.cpp has the project's RPC patch
        (its RPC server reads tensors from its own files); `offer_endpoint`: where the gossip actor
        takes offers."""
        super().__init__(ctx, "stage", **kwargs)  # type: ignore[arg-type]
        self.node_id = node_id
        self.endpoint = endpoint
        self.holdings = {layout.identity: layout for layout in holdings}
        self.memory_bytes = memory_bytes
        self.used_bytes = used_bytes
        self.work_dir = work_dir
        self.rpc_host = rpc_host
        self.n_threads = n_threads
        self.file_tensors = file_tensors
        self.offer_endpoint = offer_endpoint
        self.lease: _Lease | None = None
        self._epoch = time.time_ns() // 1_000_000  # epochs grow across restarts of this node
        self._sock: zmq.Socket | None = None
        self._offer: zmq.Socket | None = None
        self._offer_due = 0.0
        self._dead_epoch: tuple[int, str] = (0, "")  # the last lease whose RPC server died, and how

    # -- lifecycle ----------------------------------------------------------------------------

    def setup(self) -> None:
        self._sock = unbounded(self.socket(zmq.ROUTER))
        self._sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_frame_bytes)
        self.listen(self._sock, self.endpoint, "tunnel")
        self.on_socket(self._sock, self._on_frames)
        if self.offer_endpoint is not None:
            self._offer = self.socket(zmq.PUSH)
            self._offer.connect(self.offer_endpoint)
        self._publish_offer()

    def teardown(self) -> None:
        if self.lease is not None:
            self._release("the node is stopping")

    idle_tick_s = 1.0  # no lease: only the offer to repeat, every 2 s

    def idle(self) -> bool:
        return self.lease is None

    def on_tick(self, now: float) -> None:
        if now >= self._offer_due:  # again now and then: gossip keeps only the latest
            self._publish_offer()
        lease = self.lease
        if lease is None:
            return
        if now - lease.renewed_at > self.config.lease_expiry_s:
            self._release(f"head {lease.head} stopped renewing its lease")
        elif lease.state == "loading" and _listening(lease.rpc_endpoint):
            lease.cache_bytes = _dir_bytes(lease.cache_dir)
            lease.state = "ready"
            log.info(
                "stage for %s (epoch %d, layers %d-%d) ready in %.2f s; %.1f MB of RPC cache files",
                lease.head, lease.epoch, lease.claim.first, lease.claim.last,
                time.monotonic() - lease.started_at, lease.cache_bytes / 1e6,
            )  # fmt: skip
            if lease.tunnel is not None:
                lease.tunnel.serve()  # the head's engine may be waiting for it already
            self._answer(lease.zid, self._grant(lease))  # now, not at the head's next renewal

    # -- offers -------------------------------------------------------------------------------

    def offer(self) -> Offer:
        leased = self.lease.bytes if self.lease is not None else 0
        return Offer(
            memory_bytes=self.memory_bytes,
            free_bytes=max(0, self.memory_bytes - self.used_bytes - leased),
            holdings=[
                Holding(model_id=Path(h.path).stem, identity=h.identity, size=h.size)
                for h in self.holdings.values()
            ],
            stage_for=self.lease.head if self.lease is not None else "",
            file_tensors=self.file_tensors,
        )

    def _publish_offer(self) -> None:
        self._offer_due = self.clock() + 2.0
        if self._offer is not None:
            try:
                self._offer.send(encode(self.offer()), zmq.NOBLOCK)
            except zmq.Again:
                pass  # the gossip actor is gone (the node stops) or not up yet

    # -- the tunnel port ----------------------------------------------------------------------

    def _on_frames(self, frames: list[bytes]) -> None:
        zid, rest = frames[0], frames[1:]
        if len(rest) == 1:
            message = self.decode(rest[0], "tunnel")
            if isinstance(message, StageClaim):
                self._answer(zid, self._on_claim(zid, message))
            elif isinstance(message, StageRelease):
                lease = self.lease
                if lease is not None and (lease.head, lease.epoch, lease.zid) == (
                    message.head,
                    message.epoch,
                    zid,
                ):
                    self._release(f"head {lease.head} dissolved the split")
            elif message is not None:
                self.stats["refused_frames"] += 1
            return
        parsed = parse_tunnel(rest)
        if parsed is None:
            self.stats["dropped_frames"] += 1
            return
        epoch, conn, op, data = parsed
        lease = self.lease
        if lease is None or lease.epoch != epoch or lease.zid != zid or lease.tunnel is None:
            self.stats["fenced_frames"] += 1  # a stale head, or one that holds no lease
            if op != CLOSE:
                self._send(zid, tunnel_frames(epoch, conn, CLOSE))
            return
        lease.tunnel.from_head(epoch, conn, op, data)

    def _on_claim(self, zid: bytes, claim: StageClaim) -> StageGrant:
        lease, now = self.lease, self.clock()

        def refuse(why: str) -> StageGrant:
            return StageGrant(request_id=claim.request_id, epoch=0, state="refused", detail=why)

        if lease is not None and lease.head != claim.head:
            return refuse(f"node {self.node_id} serves a stage for head {lease.head} (epoch {lease.epoch})")
        if claim.epoch:  # a renewal
            if self._dead_epoch[0] == claim.epoch:
                return refuse(self._dead_epoch[1])
            if lease is None or lease.epoch != claim.epoch or lease.zid != zid:
                return refuse(f"lease epoch {claim.epoch} is not held here (expired or superseded)")
            lease.renewed_at = now
            if lease.child.exit_code() is not None:
                why = f"the RPC server exited with code {lease.child.exit_code()}"
                self._release(why)
                return refuse(why)
            return self._grant(lease)
        if lease is not None:  # the same head claims afresh: its old lease is void
            self._release(f"head {lease.head} claimed the stage again")
        layout = self.holdings.get(claim.identity)
        if layout is None:
            return refuse(f"node {self.node_id} does not hold a GGUF of identity {claim.identity}")
        if not 0 <= claim.first <= claim.last < layout.n_layer:
            return refuse(
                f"layers {claim.first}-{claim.last} are not layers of a {layout.n_layer}-layer model"
            )
        if claim.load_mode not in ("file", "hash-cache", "transfer"):
            return refuse(f"load mode {claim.load_mode!r} is not supported here")
        if claim.load_mode == "file" and not self.file_tensors:
            return refuse(
                f"node {self.node_id}'s llama.cpp lacks the project's RPC patch (no file-backed loading)"
            )
        need = sum(layout.layer_bytes[claim.first : claim.last + 1]) + OVERHEAD_BYTES
        free = self.memory_bytes - self.used_bytes
        if need > free:
            return refuse(
                f"layers {claim.first}-{claim.last} need {need / 1e9:.2f} GB; {free / 1e9:.2f} GB free"
            )
        self.lease = self._start(zid, claim, layout, need)
        self._publish_offer()
        return self._grant(self.lease)

    def _grant(self, lease: _Lease) -> StageGrant:
        return StageGrant(
            request_id=lease.claim.request_id,
            epoch=lease.epoch,
            state=lease.state,
            detail=lease.detail,
            cache_bytes=lease.cache_bytes,
        )

    def _start(self, zid: bytes, claim: StageClaim, layout: Layout, need: int) -> _Lease:
        self._epoch += 1
        port = _free_port(self.rpc_host)
        rpc_endpoint = f"{self.rpc_host}:{port}"
        cache_dir = self.work_dir / f"rpc-cache-{self._epoch}"
        argv = [
            sys.executable, "-m", "actors.engine._rpc_stage",
            "--listen", rpc_endpoint,
            "--model", layout.path,
            "--layers", f"{claim.first},{claim.last}",
            "--cache-dir", str(cache_dir),
            "--threads", str(self.n_threads),
            "--parent-pid", str(os.getpid()),
            "--load-mode", claim.load_mode,
            "--file-id", layout.identity,
        ]  # fmt: skip
        child = ChildProcess(argv)
        pid = child.start()
        self.on_fd(child.exit_fd, self._on_child_exit)
        log.info(
            "stage for head %s: epoch %d, layers %d-%d of %s (%s), RPC server pid %d on %s",
            claim.head, self._epoch, claim.first, claim.last, layout.path, claim.load_mode, pid, rpc_endpoint,
        )  # fmt: skip
        lease = _Lease(
            head=claim.head,
            zid=zid,
            epoch=self._epoch,
            claim=claim,
            bytes=need,
            renewed_at=self.clock(),
            cache_dir=cache_dir,
            rpc_endpoint=rpc_endpoint,
            child=child,
        )
        lease.tunnel = StageEnd(
            self,
            rpc_endpoint,
            lambda frames: self._send(zid, frames),
            max_connections=self.config.max_tunnel_connections,
            server_up=False,
        )
        return lease

    def _on_child_exit(self) -> None:
        """The RPC server died: the lease goes with it (the head hears it at its next renewal,
        or sooner, as its tunnelled connections close)."""
        lease = self.lease
        if lease is not None and lease.child.exit_code() is not None:
            log.warning(
                "stage for head %s: the RPC server exited with code %s", lease.head, lease.child.exit_code()
            )
            self._dead_epoch = lease.epoch, f"the RPC server exited with code {lease.child.exit_code()}"
            self._release("its RPC server died")

    def _release(self, why: str) -> None:
        lease, self.lease = self.lease, None
        if lease is None:
            return
        log.info("stage for head %s (epoch %d) released: %s", lease.head, lease.epoch, why)
        if lease.tunnel is not None:
            lease.tunnel.close()
        self.forget(lease.child.exit_fd)
        lease.child.close()
        shutil.rmtree(lease.cache_dir, ignore_errors=True)
        self._publish_offer()

    def _answer(self, zid: bytes, grant: StageGrant) -> None:
        self._send(zid, [encode(grant)])

    def _send(self, zid: bytes, frames: list[bytes]) -> None:
        assert self._sock is not None
        try:
            self._sock.send_multipart([zid, *frames])
        except zmq.ZMQError as err:  # the head is gone
            self.warn_once(f"head-gone:{zid!r}", "stage: cannot reach head: %s", err)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _listening(endpoint: str) -> bool:
    host, _, port = endpoint.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=0.2).close()
        return True
    except OSError:
        return False


def _dir_bytes(path: Path) -> int:
    try:
        return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())
    except OSError:
        return 0


def rpc_host_for(node_host: str) -> str:
    """The loopback address a stage's RPC server listens on: 127.0.0.1, or another loopback
    address when the node itself is bound to 127.0.0.1 (several nodes on one machine), so that the
    server is never reachable at the node's own address."""
    return "127.0.0.2" if node_host == "127.0.0.1" else "127.0.0.1"

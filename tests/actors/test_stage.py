"""The stage host: one head at a time, leases with epochs, fencing, expiry (a real RPC server child)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from actors import NodeConfig, encode
from actors.gguf._layout import read_layout
from actors.splits._stage import StageHost
from actors.splits._tunnel import CLOSE, OPEN, parse_tunnel, tunnel_frames
from actors.wire import decode
from actors.wire._messages import LoadMode, StageClaim, StageGrant, StageRelease
from tests.support.nodes import eventually, free_port_pair

CONFIG = dataclasses.replace(NodeConfig(), lease_expiry_s=1.5)


@pytest.fixture
def stage(zmq_ctx: zmq.Context, tiny_model: Path, tmp_path: Path) -> Iterator[StageHost]:
    host = StageHost(
        zmq_ctx,
        node_id="stage-1",
        endpoint=f"tcp://127.0.0.1:{free_port_pair(1)}",
        holdings=[read_layout(tiny_model)],
        memory_bytes=2 * 1024**3,
        used_bytes=0,
        work_dir=tmp_path,
        rpc_host="127.0.0.2",
        n_threads=1,
        config=CONFIG,
    )
    with host:
        yield host


class Head:
    """A head as the stage sees it: a DEALER with the head's node id as its routing id."""

    def __init__(self, ctx: zmq.Context, name: str, endpoint: str) -> None:
        self.name = name
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, name.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def claim(
        self, identity: str, first: int = 0, last: int = 0, epoch: int = 0, load_mode: LoadMode = "hash-cache"
    ) -> StageGrant:
        claim = StageClaim(
            request_id="r", head=self.name, identity=identity, first=first, last=last, epoch=epoch,
            load_mode=load_mode,
        )  # fmt: skip
        while self.sock.poll(0):  # a grant the stage sent unasked (it tells its head when it is ready)
            self.sock.recv_multipart()
        self.sock.send(encode(claim))
        return self.grant()

    def grant(self) -> StageGrant:
        assert self.sock.poll(5000), "the stage did not answer"
        grant = decode(self.sock.recv_multipart()[-1])
        assert isinstance(grant, StageGrant)
        return grant

    def close(self) -> None:
        self.sock.close()


def test_one_head_at_a_time_with_fenced_epochs(stage: StageHost, zmq_ctx: zmq.Context) -> None:
    identity = next(iter(stage.holdings))
    a, b = Head(zmq_ctx, "head-a", stage.endpoint), Head(zmq_ctx, "head-b", stage.endpoint)
    try:
        first = a.claim(identity)
        assert first.state == "loading" and first.epoch > 0
        lease = stage.lease
        assert lease is not None and lease.rpc_endpoint.startswith("127.0.0.2:")
        # The stage's RPC server comes up on loopback; renewals say so.
        eventually(lambda: a.claim(identity, epoch=first.epoch).state == "ready", timeout_s=30)
        # A second head is refused while the lease lives, and told whose it is.
        refused = b.claim(identity)
        assert refused.state == "refused" and "head-a" in refused.detail
        # A stale epoch renews nothing.
        assert a.claim(identity, epoch=first.epoch - 1).state == "refused"
        # Tunnel frames of another epoch, or from another head, are fenced off: closed, counted.
        a.sock.send_multipart(tunnel_frames(first.epoch - 1, 7, OPEN))
        assert a.sock.poll(5000)
        assert parse_tunnel(a.sock.recv_multipart()) == (first.epoch - 1, 7, CLOSE, b"")
        b.sock.send_multipart(tunnel_frames(first.epoch, 8, OPEN))
        assert b.sock.poll(5000)
        assert parse_tunnel(b.sock.recv_multipart()) == (first.epoch, 8, CLOSE, b"")
        eventually(lambda: stage.stats["fenced_frames"] == 2)
        # Garbage is dropped and counted; the stage still answers.
        a.sock.send_multipart([b"T", b"short", b"x"])
        a.sock.send(b"\xc1not msgpack")
        eventually(lambda: stage.stats["dropped_frames"] == 2)
        # The same head claims afresh: a new, higher epoch; the old one is void.
        second = a.claim(identity)
        assert second.epoch > first.epoch
        assert a.claim(identity, epoch=first.epoch).state == "refused"
        # A release frees the stage for another head.
        a.sock.send(encode(StageRelease(head="head-a", epoch=second.epoch)))
        eventually(lambda: stage.lease is None)
        assert b.claim(identity).state == "loading"
    finally:
        a.close()
        b.close()


def test_a_lease_nobody_renews_expires_with_its_server_and_cache(
    stage: StageHost, zmq_ctx: zmq.Context
) -> None:
    identity = next(iter(stage.holdings))
    a = Head(zmq_ctx, "head-a", stage.endpoint)
    try:
        grant = a.claim(identity)
        lease = stage.lease
        assert lease is not None
        pid = lease.child.pid
        assert pid is not None
        eventually(lambda: lease.cache_dir.exists(), timeout_s=30)
        eventually(lambda: stage.lease is None, timeout_s=10)  # lease_expiry_s without a renewal
        eventually(lambda: not lease.cache_dir.exists(), timeout_s=5)  # removed right after
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert a.claim(identity, epoch=grant.epoch).state == "refused"
    finally:
        a.close()


@pytest.mark.parametrize(
    ("identity", "first", "last", "words"),
    [
        ("0" * 32, 0, 0, "does not hold"),
        (None, 0, 99, "not layers of"),
        (None, 1, 0, "not layers of"),
    ],
)
def test_claims_it_cannot_serve_are_refused_with_the_reason(
    stage: StageHost, zmq_ctx: zmq.Context, identity: str | None, first: int, last: int, words: str
) -> None:
    a = Head(zmq_ctx, "head-a", stage.endpoint)
    try:
        grant = a.claim(identity or next(iter(stage.holdings)), first, last)
        assert grant.state == "refused" and words in grant.detail
        assert stage.lease is None
    finally:
        a.close()


def test_a_file_backed_claim_is_refused_by_a_stage_without_the_patch(
    stage: StageHost, zmq_ctx: zmq.Context
) -> None:
    """The stage fixture runs as a stock build would say it is (no `file_tensors`): it offers no
    file-backed loading, and refuses a head that asks for it anyway, naming why."""
    assert stage.offer().file_tensors is False
    a = Head(zmq_ctx, "head-a", stage.endpoint)
    try:
        grant = a.claim(next(iter(stage.holdings)), load_mode="file")
        assert grant.state == "refused" and "lacks the project's RPC patch" in grant.detail
        assert stage.lease is None
    finally:
        a.close()

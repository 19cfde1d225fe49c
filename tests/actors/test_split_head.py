"""The split head actor in process, with a real stage host (and its RPC server child)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import zmq

from actors import NodeConfig, encode
from actors.gguf._layout import read_layout
from actors.shard._worker import ShardWorker
from actors.splits._head import SplitHead
from actors.splits._stage import StageHost
from actors.wire._messages import EngineSpec, Holding, MeshView, Offer, PeerRow
from tests.support.nodes import eventually, free_port_pair

CONFIG = dataclasses.replace(NodeConfig(), split_wait_for_peers_s=0.1, lease_renew_s=0.2)
GIB = 1024**3


def test_a_split_whose_engine_never_loads_is_held_failed_instead_of_reloaded_forever(
    zmq_ctx: zmq.Context, tiny_model: Path, tmp_path: Path
) -> None:
    layout = read_layout(tiny_model)
    port = free_port_pair()
    stage = StageHost(
        zmq_ctx, node_id="stage-1", endpoint=f"tcp://127.0.0.1:{port + 3}", holdings=[layout],
        memory_bytes=2 * GIB, used_bytes=0, work_dir=tmp_path, rpc_host="127.0.0.2", n_threads=1,
        config=CONFIG,
    )  # fmt: skip
    backend = zmq_ctx.socket(zmq.ROUTER)  # stands in for the router's backend
    backend.setsockopt(zmq.LINGER, 0)
    backend.bind("inproc://split-head-router")
    spec = EngineSpec(model="fake:fail_load=1", model_id="tiny")  # every load of the engine fails
    worker = ShardWorker(
        zmq_ctx, "worker-0", spec=spec, router_endpoint="inproc://split-head-router",
        control_endpoint="inproc://split-head-worker", config=CONFIG,
    )  # fmt: skip
    head = SplitHead(
        zmq_ctx, node_id="head-1", spec=spec, layout=layout, free_bytes=GIB, force=True,
        load="hash-cache", file_tensors=False, worker=worker, control_endpoint="inproc://split-head-worker",
        view_endpoint="inproc://split-head-view", config=CONFIG,
    )  # fmt: skip
    views = zmq_ctx.socket(zmq.PUSH)
    views.setsockopt(zmq.LINGER, 0)
    offer = Offer(
        memory_bytes=2 * GIB, free_bytes=2 * GIB,
        holdings=[Holding(model_id="tiny", identity=layout.identity, size=layout.size)],
    )  # fmt: skip
    peer = PeerRow(
        node_id="stage-1", host="127.0.0.1", state="alive", rtt_ms=0.5, role="standby", models=[],
        incarnation=1, zmq_port=port, offer=offer,
    )  # fmt: skip
    try:
        with stage, head:
            views.connect("inproc://split-head-view")
            views.send(encode(MeshView(peers=[peer])))
            # The stage is claimed and made ready; the head's engine fails to load three times.
            eventually(lambda: head.state == "failed", timeout_s=60, show=lambda: (head.state, head.detail))
            assert "failed to load the split 3 times" in head.detail
            # The head tells its worker after setting its own state: the worker's thread hears it a
            # moment later (CI once read "loading" in between).
            eventually(lambda: worker.state == "failed", timeout_s=10, show=lambda: worker.state)
            assert worker.state == "failed" and worker.restarts == 3
            eventually(lambda: stage.lease is None, timeout_s=10)  # the split dissolved: the stage is free
            row = head.row()
            assert row.state == "failed" and row.stages == []
    finally:
        views.close()
        backend.close()


def _peer(node: str, identity: str, file_tensors: bool) -> PeerRow:
    offer = Offer(
        memory_bytes=2 * GIB, free_bytes=2 * GIB, file_tensors=file_tensors,
        holdings=[Holding(model_id="tiny", identity=identity, size=1)],
    )  # fmt: skip
    return PeerRow(
        node_id=node, host="127.0.0.1", state="alive", rtt_ms=0.5, role="standby", models=[],
        incarnation=1, zmq_port=9000, offer=offer,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("load", "head_patched", "stage_patched", "mode", "why"),
    [
        ("auto", True, True, "file", "both ends have the RPC patch"),
        ("auto", False, True, "hash-cache", "this node's llama.cpp lacks"),
        ("auto", True, False, "hash-cache", "the stage's llama.cpp lacks"),
        ("hash-cache", True, True, "hash-cache", "--split-load"),
        ("transfer", True, True, "transfer", "--split-load"),
    ],
)
def test_each_stage_loads_the_best_way_both_ends_can(
    zmq_ctx: zmq.Context,
    tiny_model: Path,
    load: str,
    head_patched: bool,
    stage_patched: bool,
    mode: str,
    why: str,
) -> None:
    layout = read_layout(tiny_model)
    spec = EngineSpec(model=str(tiny_model), model_id="tiny")
    worker = ShardWorker(zmq_ctx, "w", spec=spec, router_endpoint="inproc://x", control_endpoint="inproc://y")
    head = SplitHead(
        zmq_ctx, node_id="head-1", spec=spec, layout=layout, free_bytes=GIB, force=True, load=load,  # type: ignore[arg-type]
        file_tensors=head_patched, worker=worker, control_endpoint="inproc://y", view_endpoint="inproc://z",
    )  # fmt: skip
    chosen, reason = head._load_mode(_peer("stage-1", layout.identity, stage_patched))
    assert chosen == mode and why in reason
    # Before any stage is claimed, the split says what its stages would get from this end.
    assert head.row().load_mode == (
        "file" if load == "auto" and head_patched else "hash-cache" if load == "auto" else load
    )


def test_a_head_told_file_recruits_only_stages_that_can(zmq_ctx: zmq.Context, tiny_model: Path) -> None:
    layout = read_layout(tiny_model)
    spec = EngineSpec(model=str(tiny_model), model_id="tiny")
    worker = ShardWorker(zmq_ctx, "w", spec=spec, router_endpoint="inproc://x", control_endpoint="inproc://y")
    head = SplitHead(
        zmq_ctx, node_id="head-1", spec=spec, layout=layout, free_bytes=GIB, force=True, load="file",
        file_tensors=True, worker=worker, control_endpoint="inproc://y", view_endpoint="inproc://z",
    )  # fmt: skip
    head.peers = {
        p.node_id: p
        for p in (_peer("stock", layout.identity, False), _peer("patched", layout.identity, True))
    }
    assert [c.node_id for c in head._candidates()] == ["patched"]

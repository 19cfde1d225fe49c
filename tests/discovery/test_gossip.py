"""The gossip actor in process: what it does with heartbeats good and bad."""

from __future__ import annotations

import time
from collections.abc import Iterator

import msgpack
import pytest
import zmq

from actors import PROTOCOL_VERSION, NodeConfig, ask, encode, make_socket
from actors.wire._messages import Heartbeat
from discovery import Advert, Gossip, mesh_hash
from tests.support.nodes import free_port_pair

FAST = NodeConfig(heartbeat_interval_s=0.05, suspect_after_s=0.3, dead_after_s=0.3)


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def beat(node_id: str, mesh: str, incarnation: int = 1, view: list[list[object]] | None = None) -> Heartbeat:
    return Heartbeat(
        node_id=node_id, mesh=mesh_hash(mesh), incarnation=incarnation, host="127.0.0.1", zmq_port=1,
        http_port=2, role="serving", models=["m"], load={}, sent_at=0.0, echoes={}, view=view or [],
    )  # fmt: skip


@pytest.fixture
def rig(ctx: zmq.Context) -> Iterator[tuple[Gossip, zmq.Socket]]:
    """A gossip actor subscribed to a PUB the test holds (posing as a peer seed)."""
    port = free_port_pair()
    pub = make_socket(ctx, zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{port + 2}")
    me = Advert(
        node_id="me",
        mesh=mesh_hash("m1"),
        host="127.0.0.1",
        zmq_port=free_port_pair(),
        http_port=1,
        role="serving",
    )
    gossip = Gossip(
        ctx, me=me, router_endpoint="inproc://nowhere", query_endpoint="inproc://g-query",
        inbox_endpoint="inproc://g-inbox", seeds=[("127.0.0.1", port)], config=FAST,
    ).start()  # fmt: skip
    yield gossip, pub
    gossip.stop()
    pub.close()


def peers(ctx: zmq.Context) -> dict[str, str]:
    return {p["node_id"]: p["state"] for p in ask(ctx, "inproc://g-query", "peers", timeout_s=2)["peers"]}


def publish_until(pub: zmq.Socket, frames: list[bytes], done: object, timeout_s: float = 5.0) -> None:
    """PUB drops what it sends before the subscription lands: repeat until `done()` holds."""
    deadline = time.monotonic() + timeout_s
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, "not reached in time"
        for frame in frames:
            pub.send(frame)
        time.sleep(0.02)


def test_heartbeats_of_other_meshes_versions_and_garbage_are_ignored_and_counted(
    ctx: zmq.Context, rig: tuple[Gossip, zmq.Socket]
) -> None:
    gossip, pub = rig
    foreign = encode(beat("stranger", "m2"))
    future = msgpack.packb([PROTOCOL_VERSION + 1, "heartbeat", {"node_id": "future"}])
    garbage = msgpack.packb([PROTOCOL_VERSION, "heartbeat", {}])  # no fields
    friend = encode(beat("friend", "m1"))
    publish_until(pub, [foreign, future, garbage, friend], lambda: "friend" in peers(ctx))
    assert peers(ctx) == {"friend": "alive"}
    assert gossip.stats["other_mesh"] >= 1 and gossip.stats["other_version"] >= 1
    assert gossip.stats["dropped_frames"] >= 1


def test_a_peer_gone_silent_becomes_suspect_then_dead(
    ctx: zmq.Context, rig: tuple[Gossip, zmq.Socket]
) -> None:
    _, pub = rig
    publish_until(pub, [encode(beat("friend", "m1"))], lambda: "friend" in peers(ctx))
    publish_until(pub, [], lambda: peers(ctx).get("friend") == "dead")


def test_gossip_about_a_third_node_is_learned_and_rumors_of_our_death_refuted(
    ctx: zmq.Context, rig: tuple[Gossip, zmq.Socket]
) -> None:
    gossip, pub = rig
    incarnation = gossip.membership.incarnation
    view = [["third", "alive", 4, "127.0.0.1", 1], ["me", "dead", incarnation, "127.0.0.1", 1]]
    publish_until(pub, [encode(beat("friend", "m1", view=view))], lambda: "third" in peers(ctx))
    assert gossip.membership.incarnation > incarnation, "a node declared dead refutes it"

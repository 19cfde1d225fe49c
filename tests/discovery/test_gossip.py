"""The gossip actor in process: what it does with heartbeats good and bad."""

from __future__ import annotations

import time
from collections.abc import Iterator

import msgpack
import pytest
import zmq

from actors import PROTOCOL_VERSION, NodeConfig, ask, encode, make_socket
from actors.wire import decode
from actors.wire._messages import Heartbeat, Load, ViewRow
from discovery import Advert, Gossip, mesh_hash
from tests.support.nodes import free_port_pair

FAST = NodeConfig(heartbeat_interval_s=0.05, suspect_after_s=0.3, dead_after_s=0.3, hello_interval_s=0.2)


def beat(
    node_id: str, mesh: str, incarnation: int = 1, view: list[ViewRow] | None = None, port: int = 1
) -> Heartbeat:
    return Heartbeat(
        node_id=node_id, instance="i-" + node_id, mesh=mesh_hash(mesh), incarnation=incarnation,
        host="127.0.0.1", zmq_port=port, http_port=2, role="serving", models=["m"], load=Load(),
        sent_at=0.0, echoes={}, view=view or [],
    )  # fmt: skip


def row(node_id: str, state: str, incarnation: int, port: int = 1) -> ViewRow:
    return ViewRow(node_id=node_id, state=state, incarnation=incarnation, host="127.0.0.1", zmq_port=port)  # type: ignore[arg-type]


@pytest.fixture
def rig(zmq_ctx: zmq.Context) -> Iterator[tuple[Gossip, zmq.Socket]]:
    """A gossip actor subscribed to a PUB the test holds (posing as a peer seed)."""
    port = free_port_pair()
    pub = make_socket(zmq_ctx, zmq.PUB)
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
        zmq_ctx, me=me, router_endpoint="inproc://nowhere", query_endpoint="inproc://g-query",
        inbox_endpoint="inproc://g-inbox", seeds=[("127.0.0.1", port)], config=FAST,
    ).start()  # fmt: skip
    yield gossip, pub
    gossip.stop()
    pub.close()


def peers(zmq_ctx: zmq.Context) -> dict[str, str]:
    return {p["node_id"]: p["state"] for p in ask(zmq_ctx, "inproc://g-query", "peers", timeout_s=2)["peers"]}


def publish_until(pub: zmq.Socket, frames: list[bytes], done: object, timeout_s: float = 5.0) -> None:
    """PUB drops what it sends before the subscription lands: repeat until `done()` holds."""
    deadline = time.monotonic() + timeout_s
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, "not reached in time"
        for frame in frames:
            pub.send(frame)
        time.sleep(0.02)


def test_heartbeats_of_other_meshes_versions_and_garbage_are_ignored_and_counted(
    zmq_ctx: zmq.Context, rig: tuple[Gossip, zmq.Socket]
) -> None:
    gossip, pub = rig
    foreign = encode(beat("stranger", "m2"))
    future = msgpack.packb([PROTOCOL_VERSION + 1, "heartbeat", {"node_id": "future"}])
    garbage = msgpack.packb([PROTOCOL_VERSION, "heartbeat", {}])  # no fields
    friend = encode(beat("friend", "m1"))
    publish_until(pub, [foreign, future, garbage, friend], lambda: "friend" in peers(zmq_ctx))
    assert peers(zmq_ctx) == {"friend": "alive"}
    assert gossip.stats["other_mesh"] >= 1 and gossip.stats["other_version"] >= 1
    assert gossip.stats["dropped_frames"] >= 1


def test_a_peer_gone_silent_becomes_suspect_then_dead(
    zmq_ctx: zmq.Context, rig: tuple[Gossip, zmq.Socket]
) -> None:
    _, pub = rig
    publish_until(pub, [encode(beat("friend", "m1"))], lambda: "friend" in peers(zmq_ctx))
    publish_until(pub, [], lambda: peers(zmq_ctx).get("friend") == "dead")


def test_gossip_about_a_third_node_is_learned_and_rumors_of_our_death_refuted(
    zmq_ctx: zmq.Context, rig: tuple[Gossip, zmq.Socket]
) -> None:
    gossip, pub = rig
    incarnation = gossip.membership.incarnation
    view = [row("third", "alive", 4), row("me", "dead", incarnation)]
    publish_until(pub, [encode(beat("friend", "m1", view=view))], lambda: "third" in peers(zmq_ctx))
    assert gossip.membership.incarnation > incarnation, "a node declared dead refutes it"


def test_a_rumour_at_an_incarnation_past_ours_is_forged_and_changes_nothing(
    zmq_ctx: zmq.Context, rig: tuple[Gossip, zmq.Socket]
) -> None:
    """Wave 1: `dead` at 2**64 - 1 made our refutation overflow msgpack, and gossip failed every tick."""
    gossip, pub = rig
    incarnation = gossip.membership.incarnation
    forged = [row("me", "dead", 2**63 - 1)]
    publish_until(pub, [encode(beat("friend", "m1", view=forged))], lambda: "friend" in peers(zmq_ctx))
    publish_until(
        pub, [encode(beat("friend", "m1", view=forged))], lambda: gossip.membership.ignored_rumors > 0
    )
    assert gossip.membership.incarnation == incarnation
    assert gossip.stats["handler_errors"] == 0
    huge = msgpack.packb(
        [PROTOCOL_VERSION, "heartbeat", {**_fields(beat("friend", "m1")), "incarnation": 2**64 - 1}]
    )
    before = gossip.stats["dropped_frames"]
    publish_until(pub, [huge], lambda: gossip.stats["dropped_frames"] > before)


def test_no_rumour_evicts_a_peer_we_hear_directly(
    zmq_ctx: zmq.Context, rig: tuple[Gossip, zmq.Socket]
) -> None:
    gossip, pub = rig
    publish_until(pub, [encode(beat("friend", "m1"))], lambda: "friend" in peers(zmq_ctx))
    liar = encode(beat("liar", "m1", view=[row("friend", "dead", 2**62)]))
    publish_until(pub, [liar, encode(beat("friend", "m1"))], lambda: gossip.membership.ignored_rumors > 2)
    assert peers(zmq_ctx)["friend"] == "alive"


def test_forged_peer_rows_are_bounded_and_a_bad_load_is_a_dropped_frame(
    zmq_ctx: zmq.Context, rig: tuple[Gossip, zmq.Socket]
) -> None:
    """Wave 1: 10,000 forged rows took a core, 8,000 files and RSS x4, for good; `"in_flight": "x"`
    in a heartbeat's load made the router raise after `Accepted` and orphan requests."""
    gossip, pub = rig
    forged = [row(f"ghost-{i}", "alive", 1, port=20000 + i) for i in range(10_000)]
    flood = encode(beat("friend", "m1", view=forged))
    assert len(flood) < FAST.max_gossip_frame_bytes
    publish_until(pub, [flood], lambda: gossip.membership.refused_members > 0)
    assert len(gossip.membership.members()) <= FAST.max_peers
    assert len(gossip._connected) <= FAST.max_peers
    bad_load = msgpack.packb(
        [PROTOCOL_VERSION, "heartbeat", {**_fields(beat("friend", "m1")), "load": {"in_flight": "x"}}]
    )
    before = gossip.stats["dropped_frames"]
    publish_until(pub, [bad_load], lambda: gossip.stats["dropped_frames"] > before)
    assert gossip.stats["handler_errors"] == 0


def test_a_frame_over_the_gossip_limit_is_refused_before_it_is_unpacked(
    zmq_ctx: zmq.Context, rig: tuple[Gossip, zmq.Socket]
) -> None:
    """Wave 1: a 16 MiB frame was unpacked first (1.24 GB peak, a 7 s stall). ZeroMQ's MAXMSGSIZE
    now drops the connection of its sender before anything is unpacked; once that member is dead,
    its connection is re-armed, so a restarted peer at that address is heard again."""
    gossip, pub = rig
    port = gossip.seeds[0][1]  # the friend is the seed, at its real address
    publish_until(pub, [encode(beat("friend", "m1", port=port))], lambda: "friend" in peers(zmq_ctx))
    started = time.monotonic()
    for _ in range(3):
        pub.send(b"x" * (16 * 1024 * 1024))
    time.sleep(0.5)
    assert gossip.stats["dropped_frames"] == 0, "never reached the decoder"
    assert time.monotonic() - started < 3
    # The subscriber reconnected: a (restarted) peer on that link is heard again.
    again = encode(beat("friend", "m1", incarnation=2, port=port))
    publish_until(pub, [again], lambda: peers(zmq_ctx).get("friend") == "alive", timeout_s=15)


def _fields(message: Heartbeat) -> dict[str, object]:
    return msgpack.unpackb(encode(message), raw=False)[2]  # type: ignore[no-any-return]


def test_a_forming_split_is_advertised_and_a_failed_one_is_not(
    rig: tuple[Gossip, zmq.Socket], zmq_ctx: zmq.Context
) -> None:
    """Our heartbeat lists a split model while its head plans or loads it (requests then queue at
    the head instead of meeting a 404 elsewhere), not once it cannot form; our offer travels too."""
    from actors.wire._messages import Holding, Offer, SplitNews, SplitRow

    gossip, _ = rig
    sub = make_socket(zmq_ctx, zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(gossip.bind_endpoint)
    inbox = make_socket(zmq_ctx, zmq.PUSH)
    inbox.connect("inproc://g-inbox")

    def next_beat() -> Heartbeat:
        while True:
            assert sub.poll(3000)
            heard = decode(sub.recv())
            if isinstance(heard, Heartbeat):
                return heard

    def split(state: str) -> SplitNews:
        return SplitNews(
            splits=[SplitRow(model="big", head="me", epoch=1, state=state, load_mode="hash-cache", stages=[])]
        )  # type: ignore[arg-type]

    try:
        offer = Offer(memory_bytes=10, free_bytes=5, holdings=[Holding(model_id="big", identity="x", size=1)])
        inbox.send(encode(offer))
        for state, listed in (("planning", True), ("serving", True), ("failed", False), ("loading", True)):
            inbox.send(encode(split(state)))
            deadline = time.monotonic() + 3
            while True:
                heard = next_beat()
                if (heard.splits and heard.splits[0].state == state) or time.monotonic() > deadline:
                    break
            assert heard.splits[0].state == state
            assert ("big" in heard.models) is listed, (state, heard.models)
            assert heard.offer == offer
    finally:
        sub.close()
        inbox.close()


def test_a_peer_s_demand_counts_bounded_and_its_stale_claim_lapses(
    rig: tuple[Gossip, zmq.Socket], zmq_ctx: zmq.Context
) -> None:
    """A peer's report is its own unmet demand only, bounded (negative counts as nothing, a huge
    figure as at most MAX_PEER_DEMAND); its claim of a promotion blocks ours only until
    `claim_timeout_s`, so a peer that claims and never serves cannot hold a model back forever."""
    import dataclasses

    from actors.wire._messages import Demand
    from discovery._gossip import MAX_PEER_DEMAND

    gossip, pub = rig
    gossip.config = dataclasses.replace(gossip.config, claim_timeout_s=0.5)
    hostile = dataclasses.replace(
        beat("p1", "m1"),
        demand={"a": Demand(waiting=-50.0), "b": Demand(waiting=1e12), "c": Demand(waiting=2.0)},
        standby_for=["b"],
        claims=["b"],
    )
    frame = encode(hostile)
    publish_until(pub, [frame], lambda: "p1" in peers(zmq_ctx))
    publish_until(pub, [frame], lambda: gossip.mesh_demand(gossip.clock()).get("c") == 2.0, timeout_s=3)
    demand = gossip.mesh_demand(gossip.clock())
    assert "a" not in demand and demand["b"] == MAX_PEER_DEMAND
    peer = gossip._peers["p1"]
    assert peer.claims == ("b",) and peer.claimed_at["b"] <= gossip.clock()
    # Standing longer than the timeout, the claim no longer counts in what our policy is shown.
    until = time.monotonic() + 0.6
    publish_until(pub, [frame], lambda: time.monotonic() > until)  # still heard: alive throughout
    seen: list[tuple[str, ...]] = []
    gossip.elastic.step = lambda now, d, s, others: seen.extend(o.claims for o in others) or []  # type: ignore[method-assign]
    publish_until(pub, [frame], lambda: bool(seen))
    assert seen[-1] == ()

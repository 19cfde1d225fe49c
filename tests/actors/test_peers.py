"""The router's peer table, clock-driven: near and far peers, who may serve, who has room."""

from __future__ import annotations

from typing import Any

from actors import NodeConfig
from actors.routing._peers import PeerTable
from actors.wire._messages import Load, MeshView, PeerRow


def row(node: str, rtt: float | None = 1.0, models: tuple[str, ...] = ("m",), **extra: Any) -> PeerRow:
    fields: dict[str, Any] = {"state": "alive", "role": "serving", "incarnation": 1, "host": "h", **extra}
    return PeerRow(node_id=node, rtt_ms=rtt, models=list(models), **fields)


def test_near_peers_serve_first_and_far_ones_only_when_no_near_one_or_this_node_can() -> None:
    table = PeerTable(NodeConfig(max_rtt_ms=80))
    table.update(MeshView(peers=[row("near"), row("far", rtt=150), row("other", models=("x",))]), now=0)
    assert table.serving("m") == ["near"]
    assert table.serving("m", exclude=["near"]) == ["far"], "a far replica beats failing"
    assert table.serving("m", exclude=["near"], here=True) == [], "this node serves it: stay here"
    assert table.models() == {"m", "x"}


def test_a_near_peer_may_exceed_the_limit_by_a_quarter_before_it_counts_as_far() -> None:
    table = PeerTable(NodeConfig(max_rtt_ms=80))
    table.update(MeshView(peers=[row("a", rtt=50)]), now=0)
    table.update(MeshView(peers=[row("a", rtt=95)]), now=1)
    assert table.near == {"a"}
    table.update(MeshView(peers=[row("a", rtt=101)]), now=2)
    assert table.near == set()
    table.update(MeshView(peers=[row("a", rtt=95)]), now=3)
    assert table.near == set(), "coming back takes the plain limit"


def test_dead_and_departed_peers_leave_the_table_and_suspects_stay() -> None:
    table = PeerTable(NodeConfig())
    peers = [
        row("a"),
        row("b", state="suspect"),
        row("c", state="dead"),
        row("d", state="left"),
    ]
    table.update(MeshView(peers=peers), now=0)
    assert set(table.live) == {"a", "b"}


def test_room_counts_our_forwards_and_discounts_those_that_ended_after_the_gossiped_figure() -> None:
    table = PeerTable(NodeConfig())
    busy = Load(in_flight=1, queued=0, slots=1)
    table.update(MeshView(peers=[row("a", rtt=10, load=busy, heard_s_ago=0.2)]), now=10.0)  # measured ~9.79
    assert not table.has_room("a", ours=0, now=10.0)
    table.ended("a", now=9.5)  # ended before the figure was measured: already in it
    assert not table.has_room("a", ours=0, now=10.0)
    table.ended("a", now=9.9)  # ended after: the figure still counts it
    assert table.has_room("a", ours=0, now=10.0)
    assert not table.has_room("a", ours=1, now=10.0), "what we sent since counts too"
    assert not table.has_room("a", ours=0, now=25.0), "ends are forgotten after a while"

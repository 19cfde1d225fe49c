"""Several real nodes on loopback: mDNS discovery, gossip membership, failure detection."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nodes import NodeProcess, eventually, start_nodes

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def states(node: NodeProcess) -> dict[str, str]:
    return {p["node_id"]: p["state"] for p in node.status()["peers"]}


@pytest.fixture
def mesh_nodes(tiny_model: Path, tmp_path: Path) -> Iterator[list[NodeProcess]]:
    """Three nodes of mesh `alpha` and one of mesh `beta`, found by mDNS on 127.0.0.1."""
    nodes = start_nodes(tmp_path, tiny_model, [["--mesh", m] for m in ("alpha", "alpha", "alpha", "beta")])
    yield nodes
    for node in nodes:
        node.stop()


def test_three_nodes_of_a_mesh_see_each_other_alive_and_another_mesh_stays_apart(
    mesh_nodes: list[NodeProcess],
) -> None:
    alpha, beta = mesh_nodes[:3], mesh_nodes[3]
    ids = [n.status()["node_id"] for n in alpha]
    for node, me in zip(alpha, ids, strict=True):
        eventually(lambda node=node, me=me: states(node) == {i: "alive" for i in ids if i != me})
    assert beta.status()["peers"] == []
    # A peer first known from another's gossip shows its role and models once its own heartbeat came.
    eventually(lambda: all(p["role"] == "serving" for p in alpha[0].status()["peers"]))
    peer = alpha[0].status()["peers"][0]
    assert {"node_id", "host", "state", "rtt_ms", "role", "models"} <= peer.keys()
    assert peer["host"] == "127.0.0.1" and peer["role"] == "serving" and peer["models"] == ["tiny-llama"]
    eventually(lambda: all(p["rtt_ms"] is not None for p in alpha[0].status()["peers"]))
    assert all(0 <= p["rtt_ms"] < 80 for p in alpha[0].status()["peers"])
    models = alpha[0].ctl("models", "--json")
    assert '"tiny-llama"' in models.stdout and all(i in models.stdout for i in ids)


def test_a_killed_node_is_declared_dead_and_a_stopped_one_left(mesh_nodes: list[NodeProcess]) -> None:
    a, b, c = mesh_nodes[:3]
    ids = [n.status()["node_id"] for n in (a, b, c)]
    eventually(lambda: len(states(a)) == 2 and set(states(a).values()) == {"alive"})
    b.proc.kill()
    took = eventually(lambda: states(a).get(ids[1]) == "dead" and states(c).get(ids[1]) == "dead")
    assert took < 10
    c.stop()
    eventually(lambda: states(a).get(ids[2]) == "left", timeout_s=5)


def test_nodes_join_through_peer_seeds_without_mdns(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = start_nodes(tmp_path / "a", tiny_model, [["--no-mdns", "--mesh", "seeded"]])[0]
    try:
        seed = f"127.0.0.1:{first.zmq_port}"
        second = start_nodes(tmp_path / "b", tiny_model, [["--no-mdns", "--mesh", "seeded", "--peer", seed]])[
            0
        ]
        try:
            eventually(
                lambda: (
                    list(states(first).values()) == ["alive"] and list(states(second).values()) == ["alive"]
                )
            )
        finally:
            second.stop()
    finally:
        first.stop()


def test_a_node_paused_for_two_seconds_is_suspected_at_most_never_declared_dead(
    mesh_nodes: list[NodeProcess],
) -> None:
    a, b, c = mesh_nodes[:3]
    c_id = c.status()["node_id"]
    eventually(lambda: states(a).get(c_id) == "alive" and states(b).get(c_id) == "alive")
    seen: set[str] = set()
    for _ in range(3):  # SIGSTOP 2 s, run 2 s
        c.proc.send_signal(signal.SIGSTOP)
        try:
            end = time.monotonic() + 2.0
            while time.monotonic() < end:
                seen.add(states(a)[c_id])
                time.sleep(0.1)
        finally:
            c.proc.send_signal(signal.SIGCONT)
        eventually(lambda: states(a).get(c_id) == "alive", timeout_s=5)
    assert "dead" not in seen, seen

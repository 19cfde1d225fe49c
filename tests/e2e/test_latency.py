"""Latency classes: peers behind a slow link (a TCP delay proxy) are measured over the RTT limit.
A far serving node takes no inference work and calls itself a client; a far client node still
answers, by proxying to the mesh; near nodes take all the work."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.support.delay_proxy import DelayProxy
from tests.support.nodes import NodeProcess, eventually, free_port_pair, start_nodes

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
DELAY_S = 0.1  # each way through the proxy: RTT >= 100 ms, over the default 80 ms limit


def test_far_nodes_take_no_work_and_still_answer_through_the_mesh(tiny_model: Path, tmp_path: Path) -> None:
    far_port, far_proxy = free_port_pair(), free_port_pair()
    far_client_port, far_client_proxy = free_port_pair(), free_port_pair()
    proxy = DelayProxy(
        [(far_proxy + i, far_port + i) for i in range(3)]
        + [(far_client_proxy + i, far_client_port + i) for i in range(3)],
        DELAY_S,
    )
    nodes: list[NodeProcess] = []
    try:
        near = start_nodes(tmp_path, tiny_model, [["--no-mdns", "--mesh", "lat"]])
        nodes += near
        seed = f"--peer=127.0.0.1:{near[0].zmq_port}"
        nodes += start_nodes(tmp_path, tiny_model, [["--no-mdns", "--mesh", "lat", seed]])
        far_args = ["--no-mdns", "--mesh", "lat", seed, f"--advertise=127.0.0.1:{far_proxy}"]
        (far,) = start_nodes(tmp_path, tiny_model, [far_args], zmq_ports=[far_port])
        nodes.append(far)
        far_client_args = ["--no-mdns", "--mesh", "lat", seed, f"--advertise=127.0.0.1:{far_client_proxy}"]
        (far_client,) = start_nodes(tmp_path, None, [far_client_args], zmq_ports=[far_client_port])
        nodes.append(far_client)
        near_ids = {n.status()["node_id"] for n in nodes[:2]}
        far_id = far.status()["node_id"]

        def seen_by(node: NodeProcess) -> dict[str, dict]:
            return {p["node_id"]: p for p in node.status()["peers"] if p["state"] == "alive"}

        # The far node measures both near nodes over the limit and sees (from their gossiped RTTs)
        # that they are near each other: it steps back to client, and says so in its heartbeats.
        eventually(lambda: far.status()["role"] == "client", show=lambda: seen_by(far))
        eventually(lambda: seen_by(near[0]).get(far_id, {}).get("role") == "client")
        view = seen_by(near[0])[far_id]
        assert view["models"] == [] and (view["rtt_ms"] or 0) > 80
        assert any(0 < ms < 80 for ms in seen_by(far)[next(iter(near_ids))]["rtts"].values())
        assert near[0].status()["role"] == "serving"

        homes = set()
        for i in range(12):
            body = {"model": "tiny-llama", "prompt": "x", "max_tokens": 2, "user": f"u{i}"}
            r = httpx.post(f"{near[0].url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200
            homes.add(r.headers["X-Mesh-Node"])
        assert homes <= near_ids and far_id not in homes, "the far node took work"

        # A far client node has no near peer at all: it proxies to the mesh anyway.
        eventually(lambda: len(seen_by(far_client)) == 3)
        body = {"model": "tiny-llama", "prompt": "x", "max_tokens": 2, "user": "far-user"}
        r = httpx.post(f"{far_client.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["X-Mesh-Node"] in near_ids
    finally:
        for node in nodes:
            node.stop()
        proxy.close()

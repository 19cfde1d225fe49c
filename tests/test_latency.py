"""Latency classes: a peer behind a slow link (a TCP delay proxy) is measured over the RTT limit
and takes no inference work; a near peer takes it all."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests._delay_proxy import DelayProxy
from tests.conftest import eventually, free_port_pair, start_nodes

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
DELAY_S = 0.1  # each way through the proxy: RTT >= 100 ms, over the default 80 ms limit


def test_a_far_peer_takes_no_work_and_a_near_one_takes_it_all(tiny_model: Path, tmp_path: Path) -> None:
    far_port, proxy_port = free_port_pair(), free_port_pair()
    proxy = DelayProxy([(proxy_port + i, far_port + i) for i in range(3)], DELAY_S)
    nodes = []
    try:
        (near,) = start_nodes(tmp_path, tiny_model, [["--no-mdns", "--mesh", "lat"]])
        nodes.append(near)
        seed_near, seed_far = f"127.0.0.1:{near.zmq_port}", f"127.0.0.1:{proxy_port}"
        far_args = ["--no-mdns", "--mesh", "lat", "--peer", seed_near, "--advertise", seed_far]
        (far,) = start_nodes(tmp_path, tiny_model, [far_args], zmq_ports=[far_port])
        nodes.append(far)
        (client,) = start_nodes(
            tmp_path, None, [["--no-mdns", "--mesh", "lat", "--peer", seed_near, "--peer", seed_far]]
        )
        nodes.append(client)
        near_id, far_id = near.status()["node_id"], far.status()["node_id"]

        def rtts() -> dict[str, float | None]:
            return {p["node_id"]: p["rtt_ms"] for p in client.status()["peers"] if p["state"] == "alive"}

        eventually(lambda: all(rtts().get(n) is not None for n in (near_id, far_id)))
        eventually(lambda: (rtts()[far_id] or 0) > 80 and (rtts()[near_id] or 1e9) < 80)
        homes = set()
        for i in range(12):
            body = {"model": "tiny-llama", "prompt": "x", "max_tokens": 2, "user": f"u{i}"}
            r = httpx.post(f"{client.url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200
            homes.add(r.headers["X-Mesh-Node"])
        assert homes == {near_id}, "the far peer took work"
    finally:
        for node in nodes:
            node.stop()
        proxy.close()

"""Elastic serving with real node processes: a standby promotes itself under persisting unmet
demand and steps back after the cool-down; of two standbys one promotes for one unit of demand;
`mesh-ctl drain` finishes what is in flight and takes nothing new; `mesh-ctl model swap` under
load fails no request."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from actors.gguf import shape_for, synthesize
from tests.support.load import Load
from tests.support.nodes import BIN, NodeProcess, eventually, launch, start_nodes

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
MODEL = "elastic"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~9M parameters: a 300-token answer takes about a second on one thread."""
    return synthesize(
        "llama", tmp_path_factory.mktemp("m") / f"{MODEL}.gguf", shape_for("llama", "small"), seed=3
    )


def ctl(node: NodeProcess, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    argv = [str(BIN / "mesh-ctl"), "--node", node.control, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def roles(node: NodeProcess) -> tuple[str, list[str]]:
    status = node.status()
    return status["role"], [w["model"] for w in status["workers"]]


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[NodeProcess]]:
    made: list[NodeProcess] = []
    yield made
    for node in made:
        node.stop()


def mesh_args(mesh: str, seed: NodeProcess | None = None) -> list[str]:
    args = ["--no-mdns", "--mesh", mesh, "--slots", "1"]
    return [*args, "--peer", f"127.0.0.1:{seed.zmq_port}"] if seed is not None else args


def test_a_standby_promotes_under_persisting_demand_and_steps_back_after_the_cool_down(
    model: Path, tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    (serving,) = start_nodes(tmp_path, model, [mesh_args("elastic-a")])
    nodes.append(serving)
    standby = launch(
        tmp_path, model, *mesh_args("elastic-a", serving), "--standby", "--promote-after", "0.5",
        "--step-back-after", "3",
    )  # fmt: skip
    nodes.append(standby)
    standby.wait_ready()
    standby_id = standby.status()["node_id"]
    assert roles(standby) == ("standby", [])
    eventually(lambda: any(p["node_id"] == standby_id for p in serving.status()["peers"]))
    with Load(serving, MODEL, clients=3) as load:  # one slot for three clients: requests wait
        took = eventually(
            lambda: roles(standby) == ("serving", [MODEL]), timeout_s=60, show=lambda: roles(standby)
        )
        eventually(lambda: standby_id in load.served_by, timeout_s=30)  # it takes real work
        demand = serving.status()["demand"]
    assert not load.failures, load.failures
    print(f"promoted {took:.1f} s after the load began; demand seen: {json.dumps(demand)}")
    # The load is gone: after the cool-down it steps back, and takes no more work.
    eventually(lambda: roles(standby) == ("standby", []), timeout_s=60, show=lambda: roles(standby))
    r = httpx.post(
        f"{serving.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4}, timeout=30
    )
    assert r.status_code == 200 and r.headers["X-Mesh-Node"] == serving.status()["node_id"]


def test_of_two_standbys_one_promotes_for_one_unit_of_demand(
    model: Path, tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    (serving,) = start_nodes(tmp_path, model, [mesh_args("elastic-b")])
    nodes.append(serving)
    extra = ("--standby", "--promote-after", "0.5", "--step-back-after", "120")
    standbys = [launch(tmp_path, model, *mesh_args("elastic-b", serving), *extra) for _ in range(2)]
    nodes.extend(standbys)
    for node in standbys:
        node.wait_ready()
    ids = {n.status()["node_id"] for n in standbys}
    eventually(lambda: ids <= {p["node_id"] for p in serving.status()["peers"] if p["role"] == "standby"})
    with Load(serving, MODEL, clients=2):  # one more slot than the serving node has: one unit of demand
        eventually(lambda: any(roles(n)[0] == "serving" for n in standbys), timeout_s=60)
        import time

        time.sleep(6)  # long enough for a second, needless promotion to show
        serving_now = [roles(n)[0] for n in standbys]
    assert sorted(serving_now) == ["serving", "standby"], serving_now


def test_drain_finishes_the_stream_in_flight_and_takes_no_new_request(
    model: Path, tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    (a,) = start_nodes(tmp_path, model, [mesh_args("elastic-c")])
    nodes.append(a)
    (b,) = start_nodes(tmp_path, model, [mesh_args("elastic-c", a)])
    nodes.append(b)
    a_id, b_id = a.status()["node_id"], b.status()["node_id"]
    eventually(lambda: MODEL in next((p["models"] for p in a.status()["peers"] if p["node_id"] == b_id), []))
    body = {"model": MODEL, "prompt": "x", "max_tokens": 600, "temperature": 0, "stream": True, "user": "u"}
    lines: list[str] = []
    with httpx.stream("POST", f"{a.url}/v1/completions", json=body, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                lines.append(line)
            if len(lines) == 3:
                served_by = s.headers["X-Mesh-Node"]
                drained = next(n for n in (a, b) if n.status()["node_id"] == served_by)
                other = b if drained is a else a
                assert ctl(drained, "drain").returncode == 0
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # the whole answer, not cut
    eventually(lambda: roles(drained) == ("standby", []), timeout_s=30, show=lambda: roles(drained))
    for _ in range(5):  # new work, even through the drained node's own API, goes to the other
        r = httpx.post(
            f"{drained.url}/v1/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=30
        )
        assert r.status_code == 200 and r.headers["X-Mesh-Node"] == other.status()["node_id"]
    assert {a_id, b_id} == {drained.status()["node_id"], other.status()["node_id"]}


def test_a_model_swap_under_load_fails_no_request_and_the_new_file_serves(
    model: Path, tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    (node,) = start_nodes(tmp_path, model, [mesh_args("elastic-d")])
    nodes.append(node)
    newer = synthesize("llama", tmp_path / "v2" / f"{MODEL}.gguf", shape_for("llama", "small"), seed=9)
    ask = {"model": MODEL, "prompt": "the model node", "max_tokens": 12, "temperature": 0}
    before = httpx.post(f"{node.url}/v1/completions", json=ask, timeout=30).json()["choices"][0]["text"]
    with Load(node, MODEL, clients=2, max_tokens=100) as load:
        eventually(lambda: len(load.served_by) >= 2, timeout_s=30)
        swap = ctl(node, "model", "swap", str(newer), "--wait")
        assert swap.returncode == 0, swap.stdout + swap.stderr
        served = len(load.served_by)
        eventually(lambda: len(load.served_by) >= served + 2, timeout_s=30)  # and it goes on serving
    assert not load.failures, load.failures
    after = httpx.post(f"{node.url}/v1/completions", json=ask, timeout=30).json()["choices"][0]["text"]
    assert after != before  # other weights: the new file answers
    status = node.status()
    assert [w["model"] for w in status["workers"]] == [MODEL] and status["operation"]["last"]["ok"]


def test_an_operator_promotes_a_standby_and_drains_it_out_of_the_mesh(
    model: Path, tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    standby = launch(tmp_path, model, *mesh_args("elastic-e"), "--standby")
    nodes.append(standby)
    standby.wait_ready()
    refused = ctl(standby, "promote", "other-model")
    assert refused.returncode == 1 and "holds no standby model 'other-model'" in refused.stderr
    promoted = ctl(standby, "promote", MODEL, "--wait")
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert roles(standby) == ("serving", [MODEL])
    r = httpx.post(
        f"{standby.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4}, timeout=30
    )
    assert r.status_code == 200
    left = ctl(standby, "drain", "--leave", "--wait")
    assert left.returncode == 0, left.stdout + left.stderr
    assert standby.proc.wait(timeout=30) == 0  # drained, then it left on its own

"""Node identity on one machine (wave 1's symptom 1): nodes started without `--state-dir` are
distinct, a copied state dir is noticed and mended, a full disk's empty id file is not an id."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from actors._errors import PeerUnavailable
from tests.support.nodes import BIN, NodeProcess, eventually, launch, start_nodes, wait_http

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture
def stopper() -> Iterator[list[NodeProcess]]:
    nodes: list[NodeProcess] = []
    yield nodes
    for node in nodes:
        node.stop()


def alive_peers(node: NodeProcess) -> set[str]:
    return {p["node_id"] for p in node.status()["peers"] if p["state"] == "alive"}


def test_three_nodes_and_a_client_on_one_machine_without_state_dirs_are_four_nodes(
    tiny_model: Path, tmp_path: Path, stopper: list[NodeProcess]
) -> None:
    """Wave 1: they shared one id, never saw each other, and the client answered 503 forever."""
    stopper += start_nodes(tmp_path, tiny_model, [[], [], []], state_dir=False)
    stopper.append(launch(tmp_path, None, state_dir=False))
    wait_http(stopper[-1])
    ids = {n.status()["node_id"] for n in stopper}
    assert len(ids) == 4
    for node in stopper:
        eventually(
            lambda node=node: len(alive_peers(node)) == 3, 30, lambda node=node: node.status()["peers"]
        )
    client = stopper[-1]
    eventually(lambda: httpx.get(f"{client.url}/health", timeout=5).status_code == 200, 30)
    body = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 3}
    assert httpx.post(f"{client.url}/v1/completions", json=body, timeout=30).status_code == 200
    # Restarted, a node keeps its id: its state dir is its --zmq-port's.
    first = stopper[0]
    old_id = first.status()["node_id"]
    first.stop()
    stopper[0] = launch(tmp_path, tiny_model, zmq_port=first.zmq_port, state_dir=False)
    assert stopper[0].wait_ready()["node_id"] == old_id


def test_a_copied_state_dir_is_noticed_and_the_later_node_takes_a_fresh_id(
    tiny_model: Path, tmp_path: Path, stopper: list[NodeProcess]
) -> None:
    """A cloned VM image: two running nodes with one id. The later one says so and renews."""
    first = launch(tmp_path, tiny_model)
    stopper.append(first)
    original = first.wait_ready()["node_id"]
    clone = launch(tmp_path, tiny_model, "--peer", f"127.0.0.1:{first.zmq_port}", zmq_port=None)
    stopper.append(clone)
    clone.stop()  # made with its own state dir; now give it a copy of the first one's
    second_port = clone.zmq_port
    shutil.rmtree(tmp_path / f"state-{second_port}", ignore_errors=True)
    shutil.copytree(tmp_path / f"state-{first.zmq_port}", tmp_path / f"state-{second_port}", ignore=_no_lock)
    clone = launch(tmp_path, tiny_model, "--peer", f"127.0.0.1:{first.zmq_port}", zmq_port=second_port)
    stopper[-1] = clone
    eventually(lambda: "NODE ID COLLISION" in clone.log(), 30, clone.log)

    def renewed() -> bool:
        try:
            return bool(clone.status()["node_id"] != original)
        except PeerUnavailable:  # asked while it restarted under its new id (the ask was lost): ask again
            return False

    eventually(renewed, 60, clone.log)
    assert first.status()["node_id"] == original, "the node that was there first keeps its id"
    eventually(lambda: clone.status()["node_id"] in alive_peers(first), 30)
    assert (tmp_path / f"state-{second_port}" / "node_id").read_text().strip() == clone.status()["node_id"]


def _no_lock(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "lock"]


def test_an_empty_id_file_gets_a_new_id_and_a_state_dir_in_use_is_refused(
    tiny_model: Path, tmp_path: Path, stopper: list[NodeProcess]
) -> None:
    state = tmp_path / "shared-state"
    state.mkdir()
    (state / "node_id").write_text("")  # what a full disk left behind
    node = launch(tmp_path, tiny_model, "--state-dir", str(state), state_dir=False)
    stopper.append(node)
    node_id = node.wait_ready()["node_id"]
    assert node_id and (state / "node_id").read_text().strip() == node_id
    second = subprocess.run(
        [str(BIN / "mesh-llm"), "client", "--host", "127.0.0.1", "--zmq-port", "1", "--http-port", "5",
         "--state-dir", str(state), "--no-mdns"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert second.returncode == 1 and "in use by a running node" in second.stderr
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    third = subprocess.run(
        [str(BIN / "mesh-llm"), "client", "--state-dir", str(not_a_dir / "sub"), "--no-mdns"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert third.returncode == 1 and "cannot use the state directory" in third.stderr

"""Dense layer splits end to end: real nodes on loopback, a synthesized dense model, llama.cpp RPC
stages reached through the ZeroMQ tunnel."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from actors.gguf import shape_for, synthesize
from actors.gguf._layout import read_layout
from tests.support.llama_builds import is_patched, stock_llama_cpp
from tests.support.nodes import NodeProcess, eventually, launch, start_nodes, wait_http

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
MODEL = "split-small"
# --ctx 2048 --slots 2: the model needs about 0.085 GiB; each node offers 0.08 GiB, so the head
# must recruit a stage, and the layers split about evenly between them.
SIZES = ["--ctx", "2048", "--slots", "2", "--max-memory", "0.08"]
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the dense model (every node of the test holds its own "copy")."""
    folder = tmp_path_factory.mktemp("split-models")
    synthesize("llama", folder / f"{MODEL}.gguf", shape_for("llama", "small"), seed=5)
    return folder


@pytest.fixture(scope="module")
def reference(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """The same model served whole by one node (a mesh of its own)."""
    (node,) = start_nodes(
        tmp_path_factory.mktemp("whole"),
        models / f"{MODEL}.gguf",
        [["--no-mdns", "--mesh", "whole", "--ctx", "2048", "--slots", "2"]],
    )
    yield node
    node.stop()


@pytest.fixture(scope="module")
def split(
    models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[NodeProcess, list[NodeProcess]]]:
    """A head whose model does not fit its --max-memory, and a standby node holding the file."""
    tmp = tmp_path_factory.mktemp("split")
    mesh = ["--no-mdns", "--mesh", "split"]
    stage = launch(tmp, None, *mesh, *SIZES[-2:], models_dir=models)
    head = launch(tmp, models / f"{MODEL}.gguf", *mesh, *SIZES, "--peer", f"127.0.0.1:{stage.zmq_port}")
    stages = [stage]
    try:
        for node in (stage, head):
            node.wait_ready(timeout_s=90)
            wait_http(node)
        yield head, stages
    finally:
        for node in [head, *stages]:
            node.stop()


def complete(node: NodeProcess, max_tokens: int, prompt: str = PROMPT, model: str = MODEL) -> str:
    oai = openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0, timeout=120)
    reply = oai.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return reply.choices[0].text


def plan(row: dict) -> dict:
    """A split row without its moving traffic counters."""
    return {k: v for k, v in row.items() if k not in ("tunnel_bytes_up", "tunnel_bytes_down", "round_trips")}


def splits_of(node: NodeProcess) -> list[dict]:
    done = node.ctl("splits", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_model_bigger_than_its_node_is_served_by_a_split(
    split: tuple[NodeProcess, list[NodeProcess]], reference: NodeProcess
) -> None:
    head, (stage,) = split
    # Greedy output is the single node's, token for token, through the official client, asked of
    # the head or of any other node of the mesh (the stage's API forwards to the head).
    assert complete(head, 40) == complete(reference, 40) == complete(stage, 40)
    # The split as mesh-ctl shows it, from the head and from the stage.
    status = head.status()
    head_id, stage_id = status["node_id"], stage.status()["node_id"]
    (row,) = splits_of(head)
    assert row["model"] == MODEL and row["head"] == head_id and row["state"] == "serving"
    assert row["load_mode"] == "file" and row["epoch"] > 0  # both ends run the patched llama.cpp
    assert [s["load_mode"] for s in row["stages"]] == ["file", None]
    assert [s["node_id"] for s in row["stages"]] == [stage_id, head_id]
    layers = [s["layers"] for s in row["stages"]]
    assert layers[0][0] == 0 and layers[-1][1] == 3 and layers[0][1] + 1 == layers[1][0], layers
    assert row["stages"][-1]["output"] is True  # logits stay on the head
    # The stage and `status` show the same split (the tunnel counters move between the asks).
    eventually(lambda: [plan(r) for r in splits_of(stage)] == [plan(row)])
    assert [plan(r) for r in status["splits"]] == [plan(row)]
    # `models` lists the split model once, served by its head.
    models = json.loads(head.ctl("models", "--json").stdout)
    assert [(m["id"], m["nodes"]) for m in models] == [(MODEL, [head_id])]
    # The stage's llama.cpp RPC server listens on another loopback address, never the node's.
    found = re.search(r"RPC server pid \d+ on ([\d.]+):(\d+)", stage.log_path.read_text())
    assert found, stage.log()
    rpc_host, rpc_port = found.group(1), int(found.group(2))
    assert rpc_host.startswith("127.") and rpc_host != "127.0.0.1"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", rpc_port), timeout=2).close()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_a_stage_killed_or_frozen_mid_stream_is_replaced_and_the_stream_completes(
    split: tuple[NodeProcess, list[NodeProcess]],
    reference: NodeProcess,
    models: Path,
    tmp_path: Path,
    sig: signal.Signals,
) -> None:
    """A stage dies (or freezes: a stock RPC host would wait for it forever) while a stream runs;
    a spare node holding the file takes its layers and the stream goes on where it was."""
    head, stages = split
    spare = launch(
        tmp_path, None, "--no-mdns", "--mesh", "split", *SIZES[-2:], "--peer", f"127.0.0.1:{head.zmq_port}",
        models_dir=models,
    )  # fmt: skip
    stages.append(spare)  # stopped with the others
    spare.wait_ready(timeout_s=60)
    spare_id = spare.status()["node_id"]
    eventually(
        lambda: any(p["node_id"] == spare_id and p["state"] == "alive" for p in head.status()["peers"])
    )
    (row,) = splits_of(head)
    active_id = row["stages"][0]["node_id"]
    victim = next(n for n in stages if n.proc.poll() is None and n.status()["node_id"] == active_id)
    prompt = f"A stage is {sig.name} while we talk"  # no prefix in any cache: evaluated whole, as a resume is
    expected = complete(reference, 600, prompt)
    resumed = head.status()["requests"]["resumed"]
    pieces: list[str] = []
    started = threading.Event()

    def stream() -> None:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 600, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{head.url}/v1/completions", json=body, timeout=120) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: {"):
                    data = json.loads(line[6:])
                    assert "error" not in data, data
                    pieces.append(data["choices"][0]["text"])
                    # The first token comes alone, the next ones a stream interval apart: with
                    # three events in, the stream of 600 tokens is under way.
                    if len(pieces) >= 3:
                        started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    try:
        assert started.wait(60), "the stream did not start"
        os.kill(victim.proc.pid, sig)
        reader.join(120)
        assert not reader.is_alive()
        assert "".join(pieces) == expected  # nothing lost, nothing repeated, nothing truncated
        (row,) = splits_of(head)
        assert row["state"] == "serving" and row["stages"][0]["node_id"] == spare_id
        assert head.status()["requests"]["resumed"] == resumed + 1
    finally:
        if sig == signal.SIGSTOP:
            os.kill(victim.proc.pid, signal.SIGCONT)


def test_a_model_too_big_for_the_whole_mesh_gets_a_503_naming_why_until_a_node_with_room_joins(
    models: Path, tmp_path: Path
) -> None:
    mesh = ["--no-mdns", "--mesh", "too-big", "--ctx", "2048", "--slots", "2"]
    stage = launch(tmp_path, None, *mesh, "--max-memory", "0.07", models_dir=models)
    stages = [stage]
    head = launch(
        tmp_path,
        models / f"{MODEL}.gguf",
        *mesh,
        "--max-memory",
        "0.07",
        "--peer",
        f"127.0.0.1:{stage.zmq_port}",
    )
    try:
        for node in (stage, head):
            wait_http(node, timeout_s=60)
        eventually(lambda: any(r["state"] == "failed" for r in splits_of(head)), timeout_s=60)
        reply = httpx.post(
            f"{head.url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 4}, timeout=30
        )
        assert reply.status_code == 503, reply.text
        message = reply.json()["error"]["message"]
        assert "needs" in message and "1 peer(s) holding the same file" in message, message
        assert httpx.get(f"{head.url}/health", timeout=10).status_code == 503
        workers = head.status()["workers"]
        assert [w["restarts"] for w in workers] == [0]  # no crash loop
        assert head.proc.poll() is None
        # A node with room joins (or a lost stage comes back): the head plans again and serves.
        roomy = launch(
            tmp_path,
            None,
            *mesh,
            "--max-memory",
            "0.08",
            "--peer",
            f"127.0.0.1:{head.zmq_port}",
            models_dir=models,
        )
        stages = [stage, roomy]
        eventually(lambda: any(r["state"] == "serving" for r in splits_of(head)), timeout_s=90)
        reply = httpx.post(
            f"{head.url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 4}, timeout=60
        )
        assert reply.status_code == 200, reply.text
    finally:
        head.stop()
        for node in stages:
            node.stop()


WIDE = "split-wide"


def test_a_file_backed_split_moves_no_weights_and_a_stock_node_still_joins_by_hash_cache(
    tmp_path: Path,
) -> None:
    """Stages read their layers from their own GGUF: under 1 % of the slice crosses while the split
    forms, no cache files are written, and greedy output is one node's. A node whose llama.cpp is a
    stock build (its RPC backend compiled from the unpatched sdist) joins the same split by the
    hash cache instead."""
    folder = tmp_path / "models"
    folder.mkdir()
    model = folder / f"{WIDE}.gguf"
    synthesize("llama", model, shape_for("llama", "small", n_embd=512, n_ff=4096), seed=6)
    layout = read_layout(model)
    # The model needs about 0.14 GiB; the head offers 0.1 (room for a layer besides the embeddings
    # and output), a stage 0.12 (the other three layers: over 40 MB of weights).
    mesh = ["--no-mdns", "--mesh", "wide", "--ctx", "1024", "--slots", "2", "--max-memory", "0.12"]
    (tmp_path / "whole").mkdir()
    (reference,) = start_nodes(
        tmp_path / "whole", model, [["--no-mdns", "--mesh", "wide-whole", "--ctx", "1024"]]
    )
    stage = launch(tmp_path, None, *mesh, models_dir=folder)
    head = launch(tmp_path, model, *mesh, "--max-memory", "0.1", "--peer", f"127.0.0.1:{stage.zmq_port}")
    nodes = [reference, stage, head]
    try:
        for node in (stage, head):
            node.wait_ready(timeout_s=90)
            wait_http(node)
        expected = complete(reference, 40, model=WIDE)
        assert complete(head, 40, model=WIDE) == expected
        (row,) = splits_of(head)
        assert row["load_mode"] == "file" and row["stages"][0]["load_mode"] == "file", row
        first, last = row["stages"][0]["layers"]
        slice_bytes = sum(layout.layer_bytes[first : last + 1])
        assert slice_bytes > 10e6
        assert 0 < row["bytes_crossed"] < 0.01 * slice_bytes, (row["bytes_crossed"], slice_bytes)
        assert re.search(r"\d+ tensors \([\d.]+ MB\) read from its own file, 0 tensors", head.log()), (
            head.log()
        )
        assert not list(tmp_path.glob(f"state-{stage.zmq_port}/rpc-cache-*/*"))  # no duplicate of the slice
        # The stage leaves; a node running stock llama.cpp takes its place, by the hash cache.
        stock_site = stock_llama_cpp()
        assert not is_patched(stock_site) and is_patched()
        stage.stop()
        stock = launch(
            tmp_path, None, *mesh, "--peer", f"127.0.0.1:{head.zmq_port}", models_dir=folder,
            env={"PYTHONPATH": str(stock_site)},
        )  # fmt: skip
        nodes.append(stock)
        stock.wait_ready(timeout_s=90)
        stock_id = stock.status()["node_id"]

        def served_by_stock() -> bool:
            rows = splits_of(head)
            return (
                bool(rows) and rows[0]["state"] == "serving" and rows[0]["stages"][0]["node_id"] == stock_id
            )

        eventually(served_by_stock, timeout_s=120)
        (row,) = splits_of(head)
        assert row["load_mode"] == "hash-cache" and row["stages"][0]["load_mode"] == "hash-cache", row
        assert "the stage's llama.cpp lacks the project's RPC patch" in head.log()
        assert complete(head, 40, model=WIDE) == expected
    finally:
        for node in nodes:
            node.stop()

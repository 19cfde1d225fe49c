"""MoE expert parallelism: split plans, expert-sharded GGUFs that llama.cpp loads, the fidelity
gate, and shards served across nodes with sessions pinned to one node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from gguf import GGUFReader

from actors import Finished, Generate
from actors.engine._llama import LlamaEngine
from actors.gguf import shape_for, synthesize
from actors.moe._analyze import UnsupportedModel, activation_importance, moe_info, plan_split
from actors.moe._shards import Gate, split_model
from tests.support.engines import run_all
from tests.support.nodes import BIN, NodeProcess, eventually, start_nodes

SKEW = 3.0  # routers favour a few experts per layer, as trained MoEs do


def test_a_plan_puts_hot_experts_everywhere_and_every_cold_one_on_two_nodes() -> None:
    rng = np.random.default_rng(0)
    importance = rng.random((3, 8))
    plan = plan_split(importance, n_nodes=3, replicate=0.25)
    for layer in range(3):
        hot = set(np.argsort(-importance[layer])[:2].tolist())
        held = [set(node[layer]) for node in plan]
        assert len({len(h) for h in held}) == 1, "every node holds as many experts"
        assert all(hot <= h for h in held), "hot experts are on every node"
        for expert in set(range(8)) - hot:
            assert sum(expert in h for h in held) >= 2, f"cold expert {expert} on fewer than 2 nodes"
    assert {len(layer) for node in plan for layer in node} == {len(plan[0][0])}, "same count on every layer"


def test_two_nodes_hold_every_expert_between_them_and_bad_plans_are_refused() -> None:
    importance = np.random.default_rng(1).random((2, 8))
    plan = plan_split(importance, n_nodes=2, replicate=0.0)
    for layer in range(2):
        assert set(plan[0][layer]) | set(plan[1][layer]) == set(range(8))
    with pytest.raises(ValueError, match="at least 2 nodes"):
        plan_split(importance, n_nodes=1, replicate=0.25)
    with pytest.raises(ValueError, match="replicate"):
        plan_split(importance, n_nodes=2, replicate=1.0)


@pytest.mark.slow
def test_a_dense_model_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    dense = synthesize("llama", tmp_path / "dense.gguf", shape_for("llama", "tiny"))
    with pytest.raises(UnsupportedModel, match="not a Mixture-of-Experts"):
        moe_info(dense)
    out = subprocess.run(
        [str(BIN / "mesh-ctl"), "moe", "split", str(dense), "--nodes", "2", "--out", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "not a Mixture-of-Experts" in out.stderr


@pytest.mark.slow
def test_analysis_reads_router_probabilities_from_llama_cpp(tmp_path: Path) -> None:
    model = synthesize("qwen2moe", tmp_path / "m.gguf", shape_for("qwen2moe", "tiny"), router_skew=SKEW)
    importance = activation_importance(model)
    assert importance.shape == (2, 8) and np.allclose(importance.sum(axis=1), 1.0)
    assert importance.max() > 2 / 8, "a skewed router concentrates mass on a few experts"
    out = subprocess.run(
        [str(BIN / "mesh-ctl"), "moe", "analyze", str(model), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    doc = json.loads(out.stdout)
    assert doc["method"] == "activations" and doc["prompts"] > 0
    assert np.allclose(doc["importance"], importance, atol=1e-4)
    weights = subprocess.run(
        [str(BIN / "mesh-ctl"), "moe", "analyze", str(model), "--weights-only"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "WEIGHT-ONLY ESTIMATE" in weights.stdout


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
@pytest.mark.parametrize("arch", ["llama-moe", "qwen2moe"])
def test_shards_load_generate_and_match_their_manifest(tmp_path: Path, arch: str, dtype: str) -> None:
    source = synthesize(arch, tmp_path / "src.gguf", shape_for(arch, "tiny"), dtype=dtype, router_skew=SKEW)
    result = split_model(
        source, tmp_path / "out", nodes=3, replicate=0.25, gate=Gate(min_agreement=0, max_kl=1e9)
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["accepted"] and len(result.shards) == 3 == len(manifest["shards"])
    assert manifest["importance"].startswith("activations")
    reader = GGUFReader(str(source))
    src = {t.name: t for t in reader.tensors}
    arch_key = moe_info(source).arch
    for path, row in zip(result.shards, manifest["shards"], strict=True):
        assert path.name == row["file"] and path.exists()
        shard = GGUFReader(str(path))
        held = row["expert_ids"]
        k = row["experts_per_layer"]
        assert shard.get_field(f"{arch_key}.expert_count").contents() == k
        assert shard.get_field(f"{arch_key}.expert_used_count").contents() == min(2, k)
        assert shard.get_field("mesh_llm.source_model_id").contents() == "src"
        assert shard.get_field("mesh_llm.source_sha256").contents() == manifest["source_sha256"]
        assert shard.get_field("mesh_llm.expert_ids").contents() == [e for layer in held for e in layer]
        for t in shard.tensors:
            whole = src[t.name].data
            if t.name.endswith(("_exps.weight", "ffn_gate_inp.weight")):
                layer = int(t.name.split(".")[1])
                expected = whole[held[layer]]  # quantized experts: the same raw bytes
            else:
                expected = whole
            assert np.array_equal(np.asarray(t.data), np.asarray(expected)), t.name
        engine = LlamaEngine(str(path), n_ctx=128, n_threads=1)
        assert engine.model_id == "src", "a shard serves its source model's id"
        request = Generate(request_id="r", model="src", prompt="hello mesh", max_tokens=6, temperature=0)
        done = run_all(engine, [request])[-1]
        assert isinstance(done, Finished) and done.completion_tokens == 6


@pytest.mark.slow
def test_the_gate_refuses_a_split_that_is_too_thin(tmp_path: Path) -> None:
    source = synthesize("qwen2moe", tmp_path / "m.gguf", shape_for("qwen2moe", "tiny"), router_skew=SKEW)
    thick = split_model(
        source, tmp_path / "thick", nodes=2, replicate=0.5, gate=Gate(min_agreement=0, max_kl=1e9)
    )
    best = min(r["top1_agreement"] for r in thick.manifest["shards"])
    out = tmp_path / "thin"
    argv = [str(BIN / "mesh-ctl"), "moe", "split", str(source), "--nodes", "4", "--replicate", "0"]
    refused = subprocess.run(
        [*argv, "--out", str(out), "--min-agreement", "0.99"], capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 3 and "refused" in refused.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["accepted"] and not list(out.glob("*.gguf")), "a refused split leaves no shards"
    thin = min(r["top1_agreement"] for r in manifest["shards"])
    assert thin < best, "fewer experts per shard follow the full model less closely"
    forced = subprocess.run(
        [*argv, "--out", str(out), "--min-agreement", "0.99", "--force"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert forced.returncode == 0 and len(list(out.glob("*.gguf"))) == 4


@pytest.fixture
def shard_nodes(tmp_path: Path) -> Iterator[list[NodeProcess]]:
    source = synthesize("qwen2moe", tmp_path / "moe.gguf", shape_for("qwen2moe", "tiny"), router_skew=SKEW)
    shards = split_model(
        source, tmp_path / "shards", nodes=2, replicate=0.5, gate=Gate(min_agreement=0, max_kl=1e9)
    )
    nodes: list[NodeProcess] = []
    try:
        nodes += start_nodes(tmp_path, shards.shards[0], [["--mesh", "moe", "--no-mdns"]])
        seed = f"--peer=127.0.0.1:{nodes[0].zmq_port}"
        nodes += start_nodes(tmp_path, shards.shards[1], [["--mesh", "moe", "--no-mdns", seed]])
        nodes += start_nodes(tmp_path, None, [["--mesh", "moe", "--no-mdns", seed]])
        client = nodes[2]
        eventually(lambda: sum("moe" in p["models"] for p in client.status()["peers"]) == 2)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@pytest.mark.slow
@pytest.mark.e2e
def test_every_turn_of_a_session_stays_on_its_shard_node_and_moves_when_it_dies(
    shard_nodes: list[NodeProcess],
) -> None:
    a, b, client = shard_nodes
    names = {a.status()["node_id"]: a, b.status()["node_id"]: b}

    def turn(user: str, history: list[dict[str, str]]) -> str:
        body = {"model": "moe", "messages": history, "max_tokens": 4, "temperature": 0, "user": user}
        r = httpx.post(f"{client.url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        history.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
        history.append({"role": "user", "content": "and then?"})
        return r.headers["X-Mesh-Node"]

    homes: dict[str, str] = {}
    for s in range(10):
        history = [{"role": "user", "content": f"session {s} begins"}]
        seen = {turn(f"s{s}", history) for _ in range(3)}
        assert len(seen) == 1, f"session s{s} moved between nodes: {seen}"
        homes[f"s{s}"] = seen.pop()
    assert set(homes.values()) == set(names), "sessions spread over both shard nodes"
    victim = next(iter(homes.values()))
    os.kill(names[victim].proc.pid, signal.SIGKILL)
    names[victim].proc.wait()
    for user, home in homes.items():
        history = [{"role": "user", "content": f"{user} goes on"}]
        now = turn(user, history)
        assert now != victim and (home == victim or now == home)


def test_an_moe_architecture_not_supported_yet_is_refused_rather_than_split(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "deepseek.gguf"
    writer = gguf.GGUFWriter(str(path), "deepseek2")
    writer.add_block_count(1)
    writer.add_expert_count(8)
    writer.add_expert_used_count(2)
    writer.add_tensor("blk.0.ffn_gate_inp.weight", np.zeros((8, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModel, match="deepseek2 MoE models is not supported yet"):
        moe_info(path)

"""What securing a mesh costs: an open and a secured mesh side by side, each a client node in
front of two serving nodes (one llama thread each) on loopback, the same synthesized model.
Requests go to the client node's HTTP port and are forwarded over the router port — CURVE on the
secured mesh — to a serving node; rounds alternate between the two meshes.

  decode   tok/s of one streaming client (greedy, `--tokens` tokens), p50 over rounds
  ttft     time to the first token of a short prompt (the per-hop cost shows most), p50
  join     `mesh-llm client --join TOKEN` (enrol, then gossip) -> the model is routable from it,
           against `mesh-llm client --peer` on the open mesh

Targets: secured decode tok/s >= 0.97 x open; TTFT +<= 2 ms. Writes bench/results/secure.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.gguf import shape_for, synthesize
from bench._common import p50, print_targets, scratch_dir, write_result
from bench.overhead import http_client
from tests.support.nodes import NodeProcess, launch, wait_http

MODEL_ID = "secure-bench"


def _up(node: NodeProcess, timeout_s: float = 120) -> NodeProcess:
    node.wait_ready(timeout_s)
    wait_http(node)
    return node


def _routable(node: NodeProcess, timeout_s: float = 60) -> float:
    """Seconds until `node` (a client) can route the model to a serving peer."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if MODEL_ID in node.status()["mesh_models"]:
                return time.monotonic() - start
        except Exception:
            pass
        time.sleep(0.01)
    raise AssertionError(f"the model never became routable:\n{node.log()}")


def _mesh(work: Path, model: Path, secure: bool) -> list[NodeProcess]:
    """Two serving nodes and a client node, open or secured; the client is last."""
    nodes: list[NodeProcess] = []
    first = _up(launch(work, model, "--no-mdns", *(["--secure"] if secure else []), "--ctx", "1024"))
    nodes.append(first)
    seed = ["--peer", f"127.0.0.1:{first.zmq_port}", "--no-mdns"]
    for what in (model, None):
        extra = [*seed, "--ctx", "1024"] if what is not None else seed
        if secure:
            extra += ["--join", first.invite("--uses", "1")]
        nodes.append(_up(launch(work, what, *extra)))
    _routable(nodes[-1])
    assert all(n.status()["secure"] is secure for n in nodes), "the mesh is not what it should be"
    return nodes


def _join_time(work: Path, first: NodeProcess, secure: bool) -> float:
    """Launch of a client node -> the model routable from it."""
    extra = ["--peer", f"127.0.0.1:{first.zmq_port}", "--no-mdns"]
    if secure:
        extra += ["--join", first.invite("--uses", "1")]
    start = time.monotonic()
    node = launch(work, None, *extra)
    try:
        _routable(node)
        return time.monotonic() - start
    finally:
        node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="100m", help="synthesized model size (see mesh-ctl model synth)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--joins", type=int, default=3)
    args = parser.parse_args()
    work = scratch_dir("bench-secure-")
    model = synthesize("llama", work / f"{MODEL_ID}.gguf", shape_for("llama", args.preset), seed=0)
    meshes: dict[str, list[NodeProcess]] = {}
    try:
        for way in ("open", "secure"):
            meshes[way] = _mesh(work, model, way == "secure")
        clients = {way: http_client(nodes[-1].url, MODEL_ID) for way, nodes in meshes.items()}
        for run in clients.values():  # warm both paths (connections, the engines' first batch)
            run("warm up", 8)
        decode: dict[str, list[float]] = {w: [] for w in meshes}
        ttft: dict[str, list[float]] = {w: [] for w in meshes}
        for i in range(args.rounds):
            order = list(meshes) if i % 2 == 0 else list(reversed(meshes))
            for way in order:
                ttft[way].append(clients[way](f"Hi {i}", 1).ttft_ms)
                decode[way].append(
                    clients[way](f"Round {i}: tell a long story about the mesh.", args.tokens).decode_tps
                )
        joins: dict[str, list[float]] = {w: [] for w in meshes}
        for _ in range(args.joins):
            for way in meshes:
                joins[way].append(_join_time(work, meshes[way][0], way == "secure"))
    finally:
        for nodes in meshes.values():
            for node in nodes:
                node.stop()
    results: dict[str, Any] = {
        way: {
            "decode_tps_p50": round(p50(decode[way]), 2),
            "decode_tps_all": [round(x, 2) for x in decode[way]],
            "ttft_ms_p50": round(p50(ttft[way]), 2),
            "ttft_ms_all": [round(x, 2) for x in ttft[way]],
            "join_s_median": round(statistics.median(joins[way]), 3),
            "join_s_all": [round(x, 3) for x in joins[way]],
        }
        for way in meshes
    }
    ratio = results["secure"]["decode_tps_p50"] / results["open"]["decode_tps_p50"]
    extra_ms = results["secure"]["ttft_ms_p50"] - results["open"]["ttft_ms_p50"]
    results["secure_vs_open"] = {"decode_tps_ratio": round(ratio, 3), "ttft_extra_ms": round(extra_ms, 2)}
    path = write_result(
        "secure",
        {
            "setup": {
                "model": f"llama {args.preset} f16 (synthesized)",
                "mesh": "client node -> 2 serving nodes, loopback, 1 llama thread each",
                "rounds": args.rounds,
                "tokens": args.tokens,
            },
            "results": results,
        },
    )
    print(f"{'mesh':<8}{'decode tok/s p50':>18}{'TTFT ms p50':>14}{'join s':>9}")
    for way in meshes:
        r = results[way]
        print(f"{way:<8}{r['decode_tps_p50']:>18.2f}{r['ttft_ms_p50']:>14.2f}{r['join_s_median']:>9.3f}")
    print_targets(
        {
            f"secured decode tok/s >= 0.97 x open ({ratio:.3f})": ratio >= 0.97,
            f"secured TTFT + <= 2 ms ({extra_ms:+.2f} ms)": extra_ms <= 2.0,
        },
        path,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

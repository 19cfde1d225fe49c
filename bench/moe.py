"""MoE expert parallelism: split cost, fidelity, session stickiness and traffic between nodes.

(a) split time and peak RSS of writing the shards, for two synthesized qwen2moe models of the same
    width and 4 vs 16 layers (peak RSS must not grow with the model); (b) fidelity (top-1
    agreement, mean KL against the full model) for --replicate 0.25/0.5/0.75 and 2/3 nodes, on a
    model whose routers concentrate mass on a few experts; (c) 100 three-turn sessions through a
    client node over 3 shard nodes: how many stayed on one node; (d) bytes on every link between
    nodes per generated token while serving (every node is reached through a counting proxy):
    only requests and token streams cross, no tensors. Random weights throughout.

    python bench/moe.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from actors.gguf import shape_for, synthesize
from actors.moe._analyze import plan_split, weight_importance
from actors.moe._shards import Gate, file_sha256, split_model, write_shard
from bench._common import free_port_pair, print_targets, scratch_dir, write_result
from tests.support.delay_proxy import DelayProxy

BIN = Path(sys.executable).parent
SKEW = 3.0
WIDE = {
    "n_vocab": 8000,
    "n_embd": 512,
    "n_head": 8,
    "n_head_kv": 4,
    "n_ff": 1024,
    "n_ff_exp": 512,
    "n_ff_shexp": 1024,
}


def child_write(source: str, out: str, plan_file: str) -> None:
    """(runs in a child process, so that its peak RSS is the write's own) write every shard."""
    plan = json.loads(Path(plan_file).read_text())
    nodes = len(plan)
    sha = file_sha256(source)
    for i, experts in enumerate(plan):
        write_shard(source, Path(out) / f"s{i}.gguf", experts, shard=i, shards=nodes, source_sha256=sha)
    # VmHWM, not getrusage: Linux carries ru_maxrss over exec from the forked parent's image.
    status = Path("/proc/self/status").read_text().splitlines()
    hwm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mb": round(hwm_kb / 1024, 1)}))


def part_a(work: Path) -> dict[str, Any]:
    rows = {}
    for layers in (4, 16):
        source = synthesize(
            "qwen2moe", work / f"a{layers}.gguf", shape_for("qwen2moe", "tiny", n_layer=layers, **WIDE)
        )
        out = work / f"a{layers}-out"
        out.mkdir()
        plan_file = work / f"a{layers}-plan.json"
        plan_file.write_text(json.dumps(plan_split(weight_importance(source), 3, 0.25)))
        started = time.monotonic()
        child = subprocess.run(
            [sys.executable, __file__, "--child-write", str(source), str(out), str(plan_file)],
            capture_output=True,
            text=True,
            check=True,
        )
        seconds = time.monotonic() - started
        rows[f"{layers}_layers"] = {
            "model_mb": round(source.stat().st_size / 1e6, 1),
            "shards_mb": round(sum(p.stat().st_size for p in out.glob("*.gguf")) / 1e6, 1),
            "split_s": round(seconds, 2),
            "peak_rss_mb": json.loads(child.stdout.strip().splitlines()[-1])["peak_rss_mb"],
        }
        for p in [*out.glob("*.gguf"), source]:
            p.unlink()
    small, large = rows["4_layers"], rows["16_layers"]
    rows["rss_ratio_large_vs_small"] = round(large["peak_rss_mb"] / small["peak_rss_mb"], 3)
    rows["size_ratio_large_vs_small"] = round(large["model_mb"] / small["model_mb"], 3)
    return rows


def part_b(work: Path) -> dict[str, Any]:
    source = synthesize("qwen2moe", work / "b.gguf", shape_for("qwen2moe", "tiny", **WIDE), router_skew=SKEW)
    table = []
    for nodes in (2, 3):
        for replicate in (0.25, 0.5, 0.75):
            result = split_model(
                source,
                work / f"b{nodes}-{replicate}",
                nodes=nodes,
                replicate=replicate,
                gate=Gate(min_agreement=0, max_kl=1e9),
            )
            shards = result.manifest["shards"]
            table.append(
                {
                    "nodes": nodes,
                    "replicate": replicate,
                    "experts_per_shard": shards[0]["experts_per_layer"],
                    "of": result.manifest["n_expert"],
                    "top1_min": min(s["top1_agreement"] for s in shards),
                    "top1_mean": round(sum(s["top1_agreement"] for s in shards) / len(shards), 4),
                    "kl_max": max(s["mean_kl"] for s in shards),
                    "kl_mean": round(sum(s["mean_kl"] for s in shards) / len(shards), 4),
                }
            )
            for p in result.shards:
                p.unlink()
    return {"model": "qwen2moe 2 x 512, 8 experts (2 used), router skew 3", "table": table}


class _Node:
    def __init__(
        self, work: Path, model: Path | None, proxy_base: int | None, *extra: str, zmq_port: int = 0
    ) -> None:
        self.zmq_port, self.http_port = zmq_port or free_port_pair(), free_port_pair(1)
        what = ["serve", "--model", str(model), "--threads", "1", "--slots", "2"] if model else ["client"]
        advertise = [f"--advertise=127.0.0.1:{proxy_base}"] if proxy_base else []
        argv = [
            str(BIN / "mesh-llm"), *what, "--host", "127.0.0.1", "--no-mdns", "--mesh", "moe-bench",
            "--http-port", str(self.http_port), "--zmq-port", str(self.zmq_port),
            "--state-dir", str(work / f"state-{self.zmq_port}"), *advertise, *extra,
        ]  # fmt: skip
        self.log = (work / f"node-{self.zmq_port}.log").open("wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)

    def status(self) -> dict[str, Any]:
        import zmq

        from actors import ask

        ctx = zmq.Context()
        try:
            return ask(ctx, f"tcp://127.0.0.1:{self.zmq_port}", "status", timeout_s=5)
        finally:
            ctx.term()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def wait(condition: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError("condition not reached")


def part_c_d(work: Path, sessions: int) -> dict[str, Any]:
    source = synthesize(
        "qwen2moe", work / "moe.gguf", shape_for("qwen2moe", "tiny", **WIDE), router_skew=SKEW
    )
    split = split_model(source, work / "cd", nodes=3, replicate=0.5, gate=Gate(min_agreement=0, max_kl=1e9))
    # Every serving node is reached only through a counting proxy (its advertised address).
    bases = [free_port_pair() for _ in range(3)]
    nodes: list[_Node] = []
    proxy = None
    try:
        ports = [free_port_pair() for _ in range(3)]
        proxy = DelayProxy([(bases[i] + k, ports[i] + k) for i in range(3) for k in range(3)], 0.0)
        seeds = [f"--peer=127.0.0.1:{bases[0]}"]
        for i, path in enumerate(split.shards):
            nodes.append(_Node(work, path, bases[i], *(seeds if i else []), zmq_port=ports[i]))
        client = _Node(work, None, None, *seeds)
        nodes.append(client)
        wait(lambda: sum("moe" in p["models"] for p in client.status()["peers"]) == 3, 120)
        url = f"http://127.0.0.1:{client.http_port}"
        stuck = moved = 0
        homes: dict[str, str] = {}
        lock = threading.Lock()

        def session(k: int) -> None:
            nonlocal stuck, moved
            history = [{"role": "user", "content": f"session {k}: tell me about experts"}]
            seen = set()
            for _ in range(3):
                body = {
                    "model": "moe",
                    "messages": history,
                    "max_tokens": 8,
                    "temperature": 0,
                    "user": f"s{k}",
                }
                r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
                r.raise_for_status()
                seen.add(r.headers["X-Mesh-Node"])
                history += [r.json()["choices"][0]["message"], {"role": "user", "content": "go on"}]
            with lock:
                stuck += len(seen) == 1
                moved += len(seen) > 1
                homes[f"s{k}"] = seen.pop()

        threads = [
            threading.Thread(target=lambda i=i: [session(k) for k in range(i, sessions, 4)]) for i in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # (d) traffic: a quiet second, then a measured burst of generation.
        before = dict(proxy.bytes)
        time.sleep(2.0)
        idle = {p: proxy.bytes[p] - before[p] for p in before}
        before = dict(proxy.bytes)
        started = time.monotonic()
        tokens = 0
        for k in range(6):
            body = {
                "model": "moe",
                "prompt": f"burst {k}",
                "max_tokens": 200,
                "temperature": 0,
                "user": f"b{k}",
            }
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
            tokens += r.json()["usage"]["completion_tokens"]
        seconds = time.monotonic() - started
        busy = {p: proxy.bytes[p] - before[p] for p in before}
        router_ports = [b + 1 for b in bases]
        gossip_ports = [b + 2 for b in bases]
        router_bytes = sum(busy[p] for p in router_ports)
        gossip_rate_busy = sum(busy[p] for p in gossip_ports) / seconds
        gossip_rate_idle = sum(idle[p] for p in gossip_ports) / 2.0
        control_ports = list(bases)
        # Serving nodes exchange only heartbeats (and hellos on control ports): whatever
        # generation added to that, over the idle rate, is the most tensor traffic could be.
        extra = (
            sum(busy[p] for p in [*gossip_ports, *control_ports])
            - (gossip_rate_idle + sum(idle[p] for p in control_ports) / 2.0) * seconds
        )
        return {
            "stickiness": {
                "sessions": sessions,
                "turns_each": 3,
                "stayed_on_one_node": stuck,
                "moved": moved,
                "share": round(stuck / sessions, 4),
                "homes": {n: list(homes.values()).count(n) for n in set(homes.values())},
            },
            "traffic": {
                "tokens": tokens,
                "request_and_stream_bytes_per_token": round(router_bytes / tokens, 1),
                "gossip_bytes_per_s_busy": round(gossip_rate_busy),
                "gossip_bytes_per_s_idle": round(gossip_rate_idle),
                "bytes_between_serving_nodes_over_idle_per_token": round(max(0.0, extra) / tokens, 2),
                "how": "every serving node's control, router and gossip ports are reached only "
                "through a counting TCP proxy. Router ports carry the requests and token streams "
                "(client node <-> the session's node); between serving nodes there are only "
                "heartbeats, and generating adds nothing to their idle rate (no tensor traffic)",
            },
        }
    finally:
        for node in nodes:
            node.close()
        if proxy is not None:
            proxy.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--parts", default="abcd")
    parser.add_argument("--child-write", nargs=3, metavar=("SOURCE", "OUT", "PLAN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_write:
        child_write(*args.child_write)
        return 0
    work = scratch_dir("moe-bench-")
    results: dict[str, Any] = {}
    if "a" in args.parts:
        results["split_cost"] = part_a(work)
    if "b" in args.parts:
        results["fidelity"] = part_b(work)
    if "c" in args.parts or "d" in args.parts:
        results.update(part_c_d(work, args.sessions))
    targets = {}
    if "split_cost" in results:
        targets["peak RSS flat (16 vs 4 layers within 1.25x)"] = (
            results["split_cost"]["rss_ratio_large_vs_small"] <= 1.25
        )
    if "stickiness" in results:
        targets["100% of sessions on one node"] = results["stickiness"]["moved"] == 0
    path = write_result(
        "moe",
        {
            "config": {k: v for k, v in vars(args).items() if k != "child_write"},
            "results": results,
            "targets": targets,
        },
    )
    print(json.dumps(results, indent=2))
    print_targets(targets, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

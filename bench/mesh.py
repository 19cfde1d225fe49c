"""How the mesh behaves as a mesh, on loopback with real node processes:

  (a) convergence  time for 8 nodes to all see each other alive (mDNS on 127.0.0.1)
  (b) detection    kill -9 of a node -> every survivor marks it dead (median, max over trials)
  (c) slow node    SIGSTOP 2 s, SIGCONT 2 s, for a minute: false "dead" declarations
  (d) scaling      aggregate decode tok/s of 2 serving nodes vs 1, 4 concurrent clients,
                   one llama thread per node, through a client node
  (e) chaos        streamed requests while serving nodes are killed and restarted at random:
                   lost, hung, truncated or duplicated completions

Writes bench/results/mesh.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import zmq

from actors import ask
from actors.gguf import shape_for, synthesize
from bench._common import print_targets, scratch_dir, stop_process, write_result

BIN = Path(sys.executable).parent


class Node:
    """One `mesh-llm` process on loopback."""

    _next_port = 21000

    def __init__(self, work: Path, model: Path | None, *extra: str) -> None:
        self.zmq_port, self.http_port = Node._next_port, Node._next_port + 5
        Node._next_port += 10
        what = ["serve", "--model", str(model), "--threads", "1"] if model else ["client"]
        self.argv = [
            str(BIN / "mesh-llm"), *what, "--host", "127.0.0.1", "--zmq-port", str(self.zmq_port),
            "--http-port", str(self.http_port), "--state-dir", str(work / f"state-{self.zmq_port}"), *extra,
        ]  # fmt: skip
        self.log = work / f"node-{self.zmq_port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.node_id = ""
        self.start()

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)

    def status(self, ctx: zmq.Context) -> dict[str, Any] | None:
        try:
            return ask(ctx, f"tcp://127.0.0.1:{self.zmq_port}", "status", timeout_s=2)
        except Exception:
            return None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)  # type: ignore[arg-type]


def wait_until(condition: Any, timeout_s: float, poll_s: float = 0.05) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError("condition not reached")
        time.sleep(poll_s)
    return time.monotonic() - start


def views(ctx: zmq.Context, nodes: list[Node]) -> list[dict[str, str]]:
    out = []
    for node in nodes:
        status = node.status(ctx)
        out.append({p["node_id"]: p["state"] for p in status["peers"]} if status else {})
    return out


def all_up(ctx: zmq.Context, nodes: list[Node]) -> bool:
    for node in nodes:
        status = node.status(ctx)
        if status is None:
            return False
        node.node_id = status["node_id"]
    return True


def sees_serving(ctx: zmq.Context, client: Node, model: str, nodes: list[Node]) -> bool:
    """Whether `client` sees every one of `nodes` serving `model` (loaded and gossiped)."""
    peers = {p["node_id"]: p for p in (client.status(ctx) or {}).get("peers", [])}
    return all(model in peers.get(n.node_id, {}).get("models", []) for n in nodes)


def converged(ctx: zmq.Context, nodes: list[Node], alive: set[str]) -> bool:
    return all(
        {i for i, s in v.items() if s == "alive"} >= alive - {n.node_id}
        for v, n in zip(views(ctx, nodes), nodes, strict=True)
        if n.node_id in alive
    )


def part_a_b(ctx: zmq.Context, work: Path, trials: int) -> dict[str, Any]:
    nodes = [Node(work, None, "--mesh", "bench-ab") for _ in range(8)]
    try:
        wait_until(lambda: all_up(ctx, nodes), 120)
        ids = {n.node_id for n in nodes}
        convergence = wait_until(lambda: converged(ctx, nodes, ids), 60)
        detections = []
        rng = random.Random(7)
        for _ in range(trials):
            victim = rng.choice(nodes)
            survivors = [n for n in nodes if n is not victim]
            victim.kill()
            t = wait_until(
                lambda victim=victim, survivors=survivors: all(
                    v.get(victim.node_id) == "dead" for v in views(ctx, survivors)
                ),
                60,
            )
            detections.append(t)
            victim.start()
            wait_until(lambda victim=victim: victim.status(ctx) is not None, 60)
            wait_until(lambda: converged(ctx, nodes, ids), 60)
        return {
            "nodes": 8,
            "convergence_s": round(convergence, 3),
            "detection_s": [round(d, 3) for d in detections],
            "detection_median_s": round(statistics.median(detections), 3),
            "detection_max_s": round(max(detections), 3),
        }
    finally:
        for n in nodes:
            n.close()


def part_c(ctx: zmq.Context, work: Path, seconds: float) -> dict[str, Any]:
    nodes = [Node(work, None, "--mesh", "bench-c") for _ in range(3)]
    try:
        wait_until(lambda: all_up(ctx, nodes), 120)
        ids = {n.node_id for n in nodes}
        wait_until(lambda: converged(ctx, nodes, ids), 60)
        slow, watchers = nodes[0], nodes[1:]
        deaths, suspicions, last = 0, 0, dict.fromkeys(range(len(watchers)), "alive")
        end = time.monotonic() + seconds
        stopped_at = 0.0
        assert slow.proc is not None
        while time.monotonic() < end:
            phase = (time.monotonic() - end + seconds) % 4.0
            if phase < 2.0 and not stopped_at:
                slow.proc.send_signal(signal.SIGSTOP)
                stopped_at = time.monotonic()
            elif phase >= 2.0 and stopped_at:
                slow.proc.send_signal(signal.SIGCONT)
                stopped_at = 0.0
            for i, view in enumerate(views(ctx, watchers)):
                state = view.get(slow.node_id, "alive")
                if state != last[i]:
                    deaths += state == "dead"
                    suspicions += state == "suspect"
                    last[i] = state
            time.sleep(0.1)
        slow.proc.send_signal(signal.SIGCONT)
        return {
            "seconds": seconds,
            "stop_s": 2.0,
            "run_s": 2.0,
            "false_deaths": deaths,
            "suspicions": suspicions,
        }
    finally:
        for n in nodes:
            if n.proc is not None:
                n.proc.send_signal(signal.SIGCONT)
            n.close()


def stream(url: str, model: str, user: str, max_tokens: int, timeout_s: float = 120) -> dict[str, Any]:
    """One streamed completion, classified: ok, lost, hung, truncated or duplicated."""
    body = {
        "model": model, "prompt": f"{user} says", "max_tokens": max_tokens, "temperature": 0,
        "user": user, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    ids, usage, done, error, tokens_seen = set(), None, False, None, 0
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout_s) as r:
            if r.status_code != 200:
                return {"outcome": "lost", "detail": f"HTTP {r.status_code}"}
            for line in r.iter_lines():
                if line.startswith("event: error"):
                    error = line
                elif line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "id" not in chunk:
                        return {"outcome": "lost", "detail": line[:300]}
                    ids.add(chunk["id"])
                    usage = chunk.get("usage") or usage
                    tokens_seen += bool(chunk["choices"] and chunk["choices"][0]["text"])
    except httpx.TimeoutException:
        return {"outcome": "hung"}
    except httpx.HTTPError as err:
        return {"outcome": "lost", "detail": repr(err)}
    if error or not done or usage is None:
        return {"outcome": "truncated", "detail": error or "no [DONE]"}
    if len(ids) != 1 or usage["completion_tokens"] > max_tokens:
        return {"outcome": "duplicated", "detail": f"ids={len(ids)} usage={usage}"}
    if usage["completion_tokens"] < max_tokens:
        return {"outcome": "truncated", "detail": f"usage={usage}"}
    return {"outcome": "ok"}


def part_d(
    ctx: zmq.Context, work: Path, model: Path, requests: int, max_tokens: int, slots: int
) -> dict[str, Any]:
    """Aggregate decode throughput of 2 serving nodes vs 1 under 4 streaming clients, through a
    client node; enough requests that the drain at the end (one node idle) weighs little."""
    serving = [Node(work, model, "--mesh", "bench-d", "--slots", str(slots))]
    client = Node(work, None, "--mesh", "bench-d")
    try:
        wait_until(lambda: all_up(ctx, [*serving, client]), 120)

        def measure() -> float:
            n = [0]
            lock = threading.Lock()

            def worker(k: int) -> None:
                for j in range(requests // 4):
                    out = stream(client.url, model.stem, f"d-{k}-{j}-{time.monotonic_ns()}", max_tokens)
                    with lock:
                        n[0] += max_tokens if out["outcome"] == "ok" else 0

            start = time.monotonic()
            threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return n[0] / (time.monotonic() - start)

        wait_until(lambda: converged(ctx, [*serving, client], {client.node_id, serving[0].node_id}), 60)
        wait_until(lambda: sees_serving(ctx, client, model.stem, serving), 120)
        warm = stream(client.url, model.stem, "warm", 8)
        assert warm["outcome"] == "ok", warm
        one = measure()
        serving.append(Node(work, model, "--mesh", "bench-d", "--slots", str(slots)))
        wait_until(lambda: all_up(ctx, [*serving, client]), 120)
        wait_until(lambda: converged(ctx, [*serving, client], {n.node_id for n in [*serving, client]}), 60)
        wait_until(lambda: sees_serving(ctx, client, model.stem, serving), 120)
        stream(client.url, model.stem, "warm2", 8)
        two = measure()
        return {
            "clients": 4,
            "requests": requests,
            "max_tokens": max_tokens,
            "one_node_tps": round(one, 2),
            "two_nodes_tps": round(two, 2),
            "scaling": round(two / one, 3),
        }
    finally:
        for n in [*serving, client]:
            n.close()


def part_e(ctx: zmq.Context, work: Path, model: Path, requests: int, max_tokens: int) -> dict[str, Any]:
    serving = [Node(work, model, "--mesh", "bench-e") for _ in range(3)]
    client = Node(work, None, "--mesh", "bench-e")
    everyone = [*serving, client]
    outcomes: list[dict[str, Any]] = []
    kills = 0
    try:
        wait_until(lambda: all_up(ctx, everyone), 120)
        wait_until(lambda: converged(ctx, everyone, {n.node_id for n in everyone}), 60)
        done = threading.Event()
        lock = threading.Lock()

        def chaos() -> None:
            nonlocal kills
            rng = random.Random(11)
            while not done.wait(rng.uniform(1.0, 2.0)):
                victim = rng.choice(serving)
                victim.kill()
                kills += 1
                time.sleep(rng.uniform(0.5, 1.5))
                victim.start()

        def worker(k: int) -> None:
            for j in range(requests // 4):
                out = stream(client.url, model.stem, f"e-{k}-{j}", max_tokens)
                with lock:
                    outcomes.append(out)

        monkey = threading.Thread(target=chaos)
        monkey.start()
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()
        monkey.join()
        counts = {
            k: sum(o["outcome"] == k for o in outcomes)
            for k in ("ok", "lost", "hung", "truncated", "duplicated")
        }
        details = [o for o in outcomes if o["outcome"] != "ok"][:10]
        return {
            "requests": len(outcomes),
            "max_tokens": max_tokens,
            "kills": kills,
            **counts,
            "examples": details,
        }
    finally:
        for n in everyone:
            n.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=10, help="kill -9 trials for (b)")
    parser.add_argument("--stop-seconds", type=float, default=60.0, help="length of (c)")
    parser.add_argument("--scaling-requests", type=int, default=32)
    parser.add_argument("--scaling-preset", default="300m", help="synthesized model size for (d)")
    parser.add_argument("--scaling-dtype", default="q8_0", help="its weight type")
    parser.add_argument("--scaling-slots", default="1,4", help="slots per node, one run each")
    parser.add_argument("--chaos-requests", type=int, default=200)
    parser.add_argument("--parts", default="abcde")
    args = parser.parse_args()
    work = scratch_dir("mesh-bench-")
    ctx = zmq.Context()
    results: dict[str, Any] = {}
    try:
        if "a" in args.parts or "b" in args.parts:
            results["convergence_and_detection"] = part_a_b(ctx, work, args.trials)
        if "c" in args.parts:
            results["slow_node"] = part_c(ctx, work, args.stop_seconds)
        if "d" in args.parts:
            # A few hundred million parameters: compute, not the per-token plumbing (HTTP, routers,
            # the benchmark's own clients, all on the same two cores), is what a second node adds.
            preset, dtype = args.scaling_preset, args.scaling_dtype
            path = work / f"bench-{preset}-{dtype}.gguf"
            model = synthesize("llama", path, shape_for("llama", preset), dtype=dtype, seed=0)
            for slots in map(int, args.scaling_slots.split(",")):
                results[f"scaling_slots_{slots}"] = part_d(ctx, work, model, args.scaling_requests, 64, slots)
        if "e" in args.parts:
            model = synthesize("llama", work / "bench-chaos.gguf", shape_for("llama", "small"), seed=1)
            results["chaos"] = part_e(ctx, work, model, args.chaos_requests, max_tokens=384)
    finally:
        ctx.destroy(linger=0)
    targets = {}
    if "convergence_and_detection" in results:
        r = results["convergence_and_detection"]
        targets["convergence <= 2 s"] = r["convergence_s"] <= 2.0
        targets["detection max <= 5 s"] = r["detection_max_s"] <= 5.0
    if "slow_node" in results:
        targets["0 false deaths"] = results["slow_node"]["false_deaths"] == 0
    for key, r in results.items():
        if key.startswith("scaling_slots_"):
            targets[f"scaling >= 1.8x ({key[8:]})"] = r["scaling"] >= 1.8
    if "chaos" in results:
        c = results["chaos"]
        targets["0 lost/hung/truncated/duplicated"] = c["ok"] == c["requests"]
    path = write_result("mesh", {"config": vars(args), "results": results, "targets": targets})
    print(json.dumps(results, indent=2))
    print_targets(targets, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

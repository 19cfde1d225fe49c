"""Elastic serving on loopback with real nodes (a synthesized ~9M-parameter model, one slot per
node, so that a few clients are more than a node can serve):

(a) a serving node driven past its capacity through a client node, one standby holding the
    model: from the onset of over-demand to the standby's claim (detection, through gossip), to it
    serving (load), to its first answered request;
(b) three standbys and demand worth one more node: how many promote, over several trials;
(c) the 429 rate and the p50 time to an answer before and after the promotion (from (a));
(d) demand switched on and off every 30 s for 5 minutes: promotions and step-backs;
(e) `mesh-ctl rollout` of three serving nodes under steady load: failed requests and its duration.

    python bench/elastic.py [--trials 5] [--cycles 10] [--period 30]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.gguf import shape_for, synthesize
from bench._common import p50, print_targets, scratch_dir, write_result
from tests.support.load import Load
from tests.support.nodes import BIN, NodeProcess, launch, start_nodes, wait_http

MODEL = "elastic-bench"


def until(condition: Callable[[], bool], timeout_s: float, poll_s: float = 0.02) -> float | None:
    """Seconds until `condition()` held (None if it did not within `timeout_s`)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if condition():
                return time.monotonic() - start
        except Exception:
            pass
        time.sleep(poll_s)
    return None


def args_for(mesh: str, seed: NodeProcess | None, *extra: str, client: bool = False) -> list[str]:
    out = ["--no-mdns", "--mesh", mesh, *([] if client else ["--slots", "1", "--queue-depth", "2"]), *extra]
    return [*out, "--peer", f"127.0.0.1:{seed.zmq_port}"] if seed is not None else out


class Mesh:
    def __init__(self, work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.work, self.nodes = work, []  # type: ignore[var-annotated]

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: object) -> None:
        for node in self.nodes:
            node.stop()

    def add(self, node: NodeProcess) -> NodeProcess:
        self.nodes.append(node)
        return node


def promotion(work: Path, model: Path) -> dict[str, Any]:
    """(a): from the onset of over-demand (4 clients through a client node, 1 slot) to the
    standby's claim (detection), to it serving (load), to its first answer."""
    with Mesh(work / "a") as mesh:
        _, standby, client = _trio(mesh, work / "a", model, "bench-a")
        standby_id = standby.status()["node_id"]
        with Load(client, MODEL, clients=4) as load:
            onset = time.monotonic()
            since = lambda: time.monotonic() - onset  # noqa: E731
            detected = until(lambda: standby.status()["elastic"]["claims"] == [MODEL], 60)
            detected = since() if detected is not None else None
            ready = until(lambda: standby.status()["role"] == "serving" and standby.status()["ready"], 120)
            serving_at = since() if ready is not None else None
            first = until(lambda: standby_id in load.served_by, 60)
            first_at = since() if first is not None else None
        return {
            "detection_s": round(detected, 2) if detected is not None else None,
            "load_s": round(serving_at - detected, 2)
            if detected is not None and serving_at is not None
            else None,
            "first_served_s": round(first_at, 2) if first_at is not None else None,
            "failures": load.failures[:5],
        }


CGROUP = Path("/sys/fs/cgroup/cpu")  # cgroup v1's CPU controller (root): a node's share of a core


def cpu_limited(name: str, cores: float) -> list[str]:
    """A command prefix that runs a node (and the children it starts) on `cores` of CPU, as a
    machine of its own would; [] (no limit) where cgroups cannot be written."""
    group = CGROUP / f"mesh-bench-{name}"
    try:
        group.mkdir(exist_ok=True)
        (group / "cpu.cfs_quota_us").write_text(str(int(cores * 100_000)))
    except OSError as err:
        print(f"(c) runs without CPU limits: {err}")
        return []
    return ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "node"]


def before_after(work: Path, model: Path) -> dict[str, Any]:
    """(c): the same over-demand with the standby told to wait 10 s, the serving node and the
    standby each limited to half a core (on one machine, a promoted node must bring CPU of its
    own for the promotion to add capacity): 429s per second and the p50 time to an answer in the
    steady state before its promotion, and after it."""
    limits = (cpu_limited("serving", 0.5), cpu_limited("standby", 0.5))
    try:
        return _before_after(work, model, limits)
    finally:
        for name in ("serving", "standby"):  # empty once the nodes have stopped
            try:
                (CGROUP / f"mesh-bench-{name}").rmdir()
            except OSError:
                pass


def _before_after(work: Path, model: Path, limits: tuple[list[str], list[str]]) -> dict[str, Any]:
    with Mesh(work / "c") as mesh:
        _, standby, client = _trio(
            mesh, work / "c", model, "bench-c", "--promote-after", "10", prefixes=limits
        )
        standby_id = standby.status()["node_id"]
        load = Load(client, MODEL, clients=4)
        load.accept_429 = True
        with load:
            onset = time.monotonic()
            until(lambda: standby_id in load.served_by, 60)
            promoted = time.monotonic()
            time.sleep(15)
            end = time.monotonic()
        windows = {"before": (onset + 3, onset + 10), "after": (promoted + 3, end)}
        out: dict[str, Any] = {"promoted_after_s": round(promoted - onset, 2)}
        for name, (lo, hi) in windows.items():
            waits = [w for began, w in load.waits if lo <= began < hi]
            refused = [t for t in load.refused if lo <= t < hi]
            out[name] = {
                "p50_answer_s": round(p50(waits), 3),
                "requests_429_per_s": round(len(refused) / (hi - lo), 2),
                "answers": len(waits),
            }
        out["failures"] = load.failures[:5]
        return out


def _trio(
    mesh: Mesh, where: Path, model: Path, name: str, *standby_args: str,
    prefixes: tuple[list[str], list[str]] = ([], []),
) -> tuple[NodeProcess, ...]:  # fmt: skip
    """A serving node, a standby and a client node of one mesh, each seeing the others."""
    serving = mesh.add(launch(where, model, *args_for(name, None), prefix=prefixes[0]))
    serving.wait_ready()
    wait_http(serving)
    standby = mesh.add(
        launch(where, model, *args_for(name, serving, "--standby", *standby_args), prefix=prefixes[1])
    )
    (client,) = start_nodes(where, None, [args_for(name, serving, client=True)])
    mesh.add(client)
    standby.wait_ready()
    until(lambda: len(client.status()["peers"]) == 2 and MODEL in client.status()["mesh_models"], 30)
    until(lambda: any(p["role"] == "standby" for p in serving.status()["peers"]), 30)
    return serving, standby, client


def one_of_three(work: Path, model: Path, trials: int) -> dict[str, Any]:
    """(b): demand worth one more node (two clients on one slot), three standbys."""
    promoted = [_trial(work / f"b{trial}", model, f"bench-b{trial}") for trial in range(trials)]
    return {"trials": trials, "promoted_per_trial": promoted, "exactly_one": promoted.count(1)}


def _trial(where: Path, model: Path, name: str) -> int:
    with Mesh(where) as mesh:
        (serving,) = start_nodes(where, model, [args_for(name, None)])
        mesh.add(serving)
        standbys = [mesh.add(launch(where, model, *args_for(name, serving, "--standby"))) for _ in range(3)]
        for node in standbys:
            node.wait_ready()
        until(lambda: sum(p["role"] == "standby" for p in serving.status()["peers"]) == 3, 30)
        with Load(serving, MODEL, clients=2):
            until(lambda: any(n.status()["role"] == "serving" for n in standbys), 60)
            time.sleep(10)
            return sum(n.status()["role"] == "serving" for n in standbys)


def on_off(work: Path, model: Path, cycles: int, period_s: float) -> dict[str, Any]:
    """(d): demand on for `period_s`, off for `period_s`, `cycles` times."""
    with Mesh(work / "d") as mesh:
        (serving,) = start_nodes(work / "d", model, [args_for("bench-d", None)])
        mesh.add(serving)
        standby = mesh.add(launch(work / "d", model, *args_for("bench-d", serving, "--standby")))
        standby.wait_ready()
        until(lambda: any(p["role"] == "standby" for p in serving.status()["peers"]), 30)
        roles: list[tuple[float, str]] = []
        start = time.monotonic()
        for _ in range(cycles):
            with Load(serving, MODEL, clients=3) as load:
                load.accept_429 = True
                end = time.monotonic() + period_s
                while time.monotonic() < end:
                    roles.append((time.monotonic() - start, standby.status()["role"]))
                    time.sleep(0.5)
            end = time.monotonic() + period_s
            while time.monotonic() < end:
                roles.append((time.monotonic() - start, standby.status()["role"]))
                time.sleep(0.5)
        changes = [
            (round(t, 1), role)
            for (t, role), (_, prev) in zip(roles[1:], roles, strict=False)
            if role != prev
        ]
        return {
            "cycles": cycles,
            "period_s": period_s,
            "promotions": sum(role == "serving" for _, role in changes),
            "step_backs": sum(role == "standby" for _, role in changes),
            "role_changes": changes,
        }


def rollout(work: Path, model: Path) -> dict[str, Any]:
    """(e): three serving nodes under steady load, rolled to a new file one at a time."""
    newer = synthesize("llama", work / "v2" / f"{MODEL}.gguf", shape_for("llama", "small"), seed=8)
    with Mesh(work / "e") as mesh:
        (first,) = start_nodes(work / "e", model, [args_for("bench-e", None)])
        mesh.add(first)
        rest = start_nodes(work / "e", model, [args_for("bench-e", first), args_for("bench-e", first)])
        for node in rest:
            mesh.add(node)
        until(lambda: sum(MODEL in p["models"] for p in first.status()["peers"]) == 2, 30)
        with Load(first, MODEL, clients=3, max_tokens=100) as load:
            time.sleep(2)
            started = time.monotonic()
            out = subprocess.run(
                [str(BIN / "mesh-ctl"), "--node", first.control, "rollout", MODEL, str(newer)],
                capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            took = time.monotonic() - started
            time.sleep(2)
        return {
            "nodes": 3,
            "exit_code": out.returncode,
            "seconds": round(took, 1),
            "requests_served": len(load.served_by),
            "failed_requests": len(load.failures),
            "failures": load.failures[:5],
            "output": out.stdout.strip().splitlines()[-1:] + out.stderr.strip().splitlines()[-2:],
        }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--period", type=float, default=30.0)
    args = parser.parse_args()
    work = scratch_dir("elastic-bench-")
    model = synthesize("llama", work / f"{MODEL}.gguf", shape_for("llama", "small"), seed=3)
    results = {
        "a_promotion": promotion(work, model),
        "c_before_after": before_after(work, model),
        "b_one_of_three": one_of_three(work, model, args.trials),
        "e_rollout": rollout(work, model),
        "d_on_off": on_off(work, model, args.cycles, args.period),
    }
    a, b, d, e = (results[k] for k in ("a_promotion", "b_one_of_three", "d_on_off", "e_rollout"))
    targets = {
        "(a) detection <= 2 s": a["detection_s"] is not None and a["detection_s"] <= 2.0,
        "(b) exactly one of three standbys promotes, every trial": b["exactly_one"] == b["trials"],
        "(d) at most one promotion and one step-back per on/off cycle": (
            d["promotions"] <= d["cycles"] and d["step_backs"] <= d["cycles"]
        ),
        "(e) rollout: 0 failed requests": e["failed_requests"] == 0 and e["exit_code"] == 0,
    }
    setup = {
        "model": "llama small (~9M parameters, random weights), 1 slot per node, queue depth 2",
        "cpu": "(c): the serving node and the standby limited to 0.5 core each (cgroup v1 cpu quota)",
        "config": "defaults: promote after 1 s of demand >= 0.5, step back after 45 s without",
        **vars(args),
    }
    path = write_result("elastic", {"setup": setup, "results": results, "targets": targets})
    for name, r in results.items():
        print(name, {k: v for k, v in r.items() if k not in ("role_changes", "failures")})
    print_targets(targets, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

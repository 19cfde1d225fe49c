"""`mesh-ctl`: operate a node over ZeroMQ, and the GGUF tooling."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import zmq

from actors import PeerUnavailable, ask
from actors.gguf import ARCHS, PRESETS, shape_for, synthesize
from actors.moe._analyze import (
    CALIBRATION_PROMPTS,
    UnsupportedModel,
    activation_importance,
    moe_info,
    weight_importance,
)
from actors.moe._shards import Gate, split_model, stderr_progress
from actors.runtime._ask import Refused as HandshakeRefused
from actors.wire._curve import ClientKeys
from discovery._trust import TrustError, TrustFiles

_SHAPE_FLAGS = {
    "vocab": "n_vocab",
    "embd": "n_embd",
    "layers": "n_layer",
    "heads": "n_head",
    "kv_heads": "n_head_kv",
    "ff": "n_ff",
    "ctx_train": "n_ctx_train",
    "experts": "n_expert",
    "experts_used": "n_expert_used",
    "expert_ff": "n_ff_exp",
    "shared_ff": "n_ff_shexp",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mesh-ctl", description="Operate a mesh-llm node.")
    parser.add_argument("--node", default="tcp://127.0.0.1:9338", help="the node's control endpoint")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the node")
    parser.add_argument(
        "--state-dir", type=Path,
        help="the --state-dir of a node of a secured mesh on this machine: talk with its credentials",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    invite = sub.add_parser("invite", help="print a token that lets one more node join this secured mesh")
    invite.add_argument(
        "--ttl", type=float, default=3600.0, metavar="SECONDS", help="valid this long (0: forever)"
    )
    invite.add_argument("--uses", type=int, default=1, help="how many nodes may join with it")
    revoke = sub.add_parser("revoke", help="remove a node from this secured mesh, for good")
    revoke.add_argument("node_id")
    for name, text in (
        ("status", "this node and its peers"),
        ("peers", "the peers this node knows"),
        ("models", "models the mesh serves"),
        ("splits", "dense models split over several nodes, and their stages"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--json", action="store_true", help="print JSON")
    drain = sub.add_parser("drain", help="stop taking work, finish what is in flight, unload (step back)")
    drain.add_argument("--leave", action="store_true", help="then stop the node")
    drain.add_argument("--wait", action="store_true", help="return once it is done")
    promote = sub.add_parser("promote", help="load a model this node stands by for, and serve it")
    promote.add_argument("model")
    promote.add_argument("--wait", action="store_true", help="return once it serves")
    rollout = sub.add_parser(
        "rollout", help="swap MODEL for the GGUF at PATH on every node serving it, one node at a time"
    )
    rollout.add_argument("model")
    rollout.add_argument("path", help="the new GGUF, at this path on every node")
    rollout.add_argument("--step-timeout", type=float, default=600.0, help="seconds per node at most")
    model = sub.add_parser("model", help="model tooling").add_subparsers(dest="model_command", required=True)
    swap = model.add_parser(
        "swap", help="load the GGUF at PATH next to the served model, then retire the old"
    )
    swap.add_argument("path", type=Path)
    swap.add_argument("--wait", action="store_true", help="return once the new model serves")
    synth = model.add_parser("synth", help="write a GGUF with random weights (for tests and demos)")
    synth.add_argument("--arch", choices=ARCHS, required=True)
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="base shape (default tiny)")
    for flag in _SHAPE_FLAGS:
        synth.add_argument(f"--{flag.replace('_', '-')}", type=int, dest=flag)
    synth.add_argument("--type", choices=("f32", "f16", "q8_0"), default="f16", help="weight type")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--router-skew", type=float, default=0.0, help="MoE: make each layer's router favour a few experts"
    )
    synth.add_argument(
        "--no-bos", action="store_true", help="a tokenizer that adds no BOS token (as Qwen2's does)"
    )
    _moe_commands(sub)
    return parser


def _moe_commands(sub: Any) -> None:
    moe = sub.add_parser("moe", help="Mixture-of-Experts tooling").add_subparsers(
        dest="moe_command", required=True
    )
    analyze = moe.add_parser("analyze", help="per-layer expert importance from real activations")
    analyze.add_argument("model", type=Path)
    analyze.add_argument("--json", action="store_true", help="print JSON")
    split = moe.add_parser("split", help="one GGUF per node, each with a share of the experts")
    split.add_argument("model", type=Path)
    split.add_argument("--nodes", type=int, required=True, help="how many shards (nodes)")
    split.add_argument("--out", type=Path, required=True, help="directory for the shards and manifest.json")
    split.add_argument(
        "--replicate", type=float, default=0.25, help="fraction of hottest experts put on every node (0.25)"
    )
    split.add_argument("--min-agreement", type=float, default=Gate().min_agreement, help="gate: top-1 floor")
    split.add_argument("--max-kl", type=float, default=Gate().max_kl, help="gate: mean KL ceiling (nats)")
    split.add_argument("--force", action="store_true", help="keep a split that fails the gate")
    for cmd in (analyze, split):
        cmd.add_argument("--prompts", type=Path, help="calibration prompts, one per line (default: built in)")
        cmd.add_argument("--weights-only", action="store_true", help="estimate importance from weights only")
        cmd.add_argument("--threads", type=int, default=2)


_credentials: list[ClientKeys] = []  # set by main from --state-dir: every query uses them


def query(node: str, what: str, timeout_s: float, args: dict[str, Any] | None = None) -> dict[str, Any]:
    ctx = zmq.Context()
    keys = _credentials[0] if _credentials else None
    try:
        return ask(ctx, node, what, timeout_s=timeout_s, args=args, keys=keys)
    except HandshakeRefused as err:
        if keys is None:
            raise HandshakeRefused(
                f"{err}. It is a node of a secured mesh: run mesh-ctl on its machine with "
                "--state-dir DIR (that node's state directory, which holds its credentials)"
            ) from err
        raise HandshakeRefused(
            f"{err}. The credentials of --state-dir are not a member's of its mesh"
        ) from err
    finally:
        ctx.term()


def _why(err: PeerUnavailable) -> str:
    """What to tell the user when a node does not answer."""
    return str(err) if isinstance(err, HandshakeRefused) else f"{err} (is a node running there?)"


def credentials(state_dir: Path, node: str) -> ClientKeys:
    """The CURVE credentials of the node whose state directory is `state_dir`, to talk to `node`
    (itself, or another member of its mesh). Raises `TrustError` saying what is missing."""
    try:
        node_id = (state_dir / "node_id").read_text().strip()
    except OSError as err:
        raise TrustError(f"{state_dir} is not a node's state directory ({err.strerror})") from err
    files = TrustFiles(state_dir, node_id)
    if not files.exists():
        raise TrustError(f"{state_dir} holds no credentials: its node is not part of a secured mesh")
    keys = files.node_keys()
    _, roster = files.roster()
    host, _, port = node.removeprefix("tcp://").rpartition(":")
    target = next((m for m in roster.members if (m.host, str(m.zmq_port)) == (host, port)), None)
    server = target.curve_key if target is not None else keys.curve_public
    return ClientKeys(public=keys.curve_public, secret=keys.curve_secret, server=server)


def run_trust_command(args: argparse.Namespace) -> int:
    """`invite` and `revoke`, on the node that holds the mesh's authority."""
    if args.command == "invite":
        if args.uses < 1 or args.ttl < 0:
            print("mesh-ctl: --uses is at least 1 and --ttl at least 0", file=sys.stderr)
            return 2
        request = {"ttl_s": args.ttl, "uses": args.uses}
    else:
        request = {"node_id": args.node_id}
    data = answer_or_say(args, request)
    if data is None:
        return 1
    if args.command == "invite":
        print(data["token"])
    else:
        print(f"revoked {data['revoked']} (roster version {data['version']})")
    return 0


class Refused(Exception):
    """A node that cannot be reached, or that refused an operation (the message says which)."""


def start_operation(node: str, what: str, args: dict[str, Any], timeout_s: float) -> Any:
    """Ask a node to change (drain, promote, swap); the outcome of its previous change, to tell
    this one's apart when it ends. Raises `Refused`."""
    try:
        before = query(node, "status", timeout_s).get("operation") or {}
        answer = query(node, what, timeout_s, args)
    except PeerUnavailable as err:
        raise Refused(_why(err)) from err
    if "error" in answer:
        raise Refused(answer["error"])
    return before.get("last")


def run_operation(node: str, what: str, args: dict[str, Any], wait: bool, timeout_s: float) -> int:
    """`drain`, `promote`, `model swap`: with `wait`, until the node reports the outcome."""
    try:
        previous = start_operation(node, what, args, timeout_s)
    except Refused as err:
        print(f"mesh-ctl: {err}", file=sys.stderr)
        return 1
    print(f"{what}: accepted by {node}")
    if not wait:
        return 0
    outcome = wait_operation(node, what, previous, timeout_s=24 * 3600)
    print(f"{what}: {outcome.get('detail')} ({outcome.get('seconds')} s)")
    return 0 if outcome.get("ok") else 1


def wait_operation(node: str, what: str, previous: Any, timeout_s: float) -> dict[str, Any]:
    """The outcome of the node's next finished `what` after `previous`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = query(node, "status", 5.0).get("operation") or {}
        except PeerUnavailable:
            if what == "drain":  # drain --leave: the node is gone, as asked
                return {"ok": True, "detail": "drained; the node has left", "seconds": None}
            time.sleep(0.5)
            continue
        last = state.get("last") or {}
        if last and last != previous and last.get("what") == what and not state.get("doing"):
            return last
        time.sleep(0.2)
    return {"ok": False, "detail": f"no outcome within {timeout_s:g} s"}


def run_rollout(args: argparse.Namespace) -> int:
    """Swap MODEL for PATH on every node serving it, one after the other: each node loads the
    new GGUF next to the old and retires the old once its streams end, so the model keeps
    serving throughout; the next node starts once the previous one serves the new file."""
    try:
        status = query(args.node, "status", args.timeout)
    except PeerUnavailable as err:
        print(f"mesh-ctl: {_why(err)}", file=sys.stderr)
        return 1
    targets = [f"tcp://{status['host']}:{status['zmq_port']}"] if args.model in status["models"] else []
    targets += [
        f"tcp://{p['host']}:{p['zmq_port']}"
        for p in status["peers"]
        if p["state"] == "alive" and args.model in p["models"] and p.get("zmq_port")
    ]
    if not targets:
        print(f"mesh-ctl: no node serves {args.model}", file=sys.stderr)
        return 1
    started = time.monotonic()
    for i, node in enumerate(targets, 1):
        print(f"[{i}/{len(targets)}] {node}: swapping to {args.path}")
        try:
            previous = start_operation(node, "swap", {"path": args.path}, args.timeout)
        except Refused as err:
            print(f"mesh-ctl: {node}: {err}; rollout stopped", file=sys.stderr)
            return 1
        outcome = wait_operation(node, "swap", previous, args.step_timeout)
        print(f"[{i}/{len(targets)}] {node}: {outcome.get('detail')}")
        if not outcome.get("ok"):
            print("mesh-ctl: rollout stopped", file=sys.stderr)
            return 1
    print(f"rolled out to {len(targets)} node(s) in {time.monotonic() - started:.1f} s")
    return 0


def print_status(data: dict[str, Any]) -> None:
    mesh = f"{'secured' if data.get('secure') else 'open'} mesh {data['mesh']}"
    print(f"node     {data['node_id']}  ({mesh}, role {data['role']}, v{data['version']})")
    print(
        f"address  http://{data['host']}:{data['http_port']}  zmq {data['zmq_port']}  up {data['uptime_s']}s"
    )
    print(f"models   {', '.join(data['models']) or '-'}   ready: {'yes' if data['ready'] else 'no'}")
    for w in data["workers"]:
        print(
            f"  {w['worker_id']:<10} {w['model']:<28} {w['state']:<8} pid {w['engine_pid']}"
            f"  restarts {w['restarts']}  active {w['active']}/{w['slots']}"
        )
    reqs = data["requests"]
    print("requests " + "  ".join(f"{k} {v}" for k, v in reqs.items()) + f"  at engines {data['in_flight']}")
    spec = data.get("speculative") or {}
    if spec.get("drafted_tokens"):
        print(
            f"drafting {spec['drafted_tokens']} tokens drafted, {spec['accepted_tokens']} accepted"
            f" ({spec['acceptance_rate']:.0%})"
        )
    for model, d in (data.get("demand") or {}).items():
        here = d["here"]
        print(
            f"demand   {model}: {d['mesh']} in the mesh (here {here['waiting']} waiting, "
            f"{here['rejected_per_s']} refused/s)"
        )
    elastic = data.get("elastic") or {}
    if elastic.get("standby_for") or elastic.get("claims") or elastic.get("promoted"):
        print(
            f"elastic  standby for {', '.join(elastic.get('standby_for') or []) or '-'}"
            f"  claims {', '.join(elastic.get('claims') or []) or '-'}"
            f"  promoted {', '.join(elastic.get('promoted') or []) or '-'}"
        )
    operation = data.get("operation") or {}
    if operation.get("doing") or operation.get("last"):
        last = operation.get("last") or {}
        print(
            f"operator {operation.get('doing') or 'idle'}"
            + (
                f"; last: {last.get('what')} {'ok' if last.get('ok') else 'FAILED'}: {last.get('detail')}"
                if last
                else ""
            )
        )
    if data.get("splits"):
        print_splits(data["splits"])
    print_peers(data["peers"])


def print_splits(splits: list[dict[str, Any]]) -> None:
    if not splits:
        print("splits   none")
        return
    for s in splits:
        print(
            f"split    {s['model']}  head {s['head']}  epoch {s['epoch']}  {s['state']}  "
            f"load {s['load_mode']}  {s['bytes_crossed'] / 1e6:.1f} MB crossed"
            + (f"  ({s['detail']})" if s["detail"] else "")
        )
        for stage in s["stages"]:
            first, last = stage["layers"]
            print(f"  {stage['node_id']:<24} layers {first}-{last}{'  + output' if stage['output'] else ''}")


def print_peers(peers: list[dict[str, Any]]) -> None:
    if not peers:
        print("peers    none")
        return
    print(f"{'PEER':<24} {'HOST':<16} {'STATE':<8} {'RTT ms':>7}  {'ROLE':<8} MODELS")
    for p in peers:
        models = ", ".join(p["models"])
        rtt = "-" if p["rtt_ms"] is None else f"{p['rtt_ms']:.1f}"
        print(f"{p['node_id']:<24} {p['host']:<16} {p['state']:<8} {rtt:>7}  {p['role']:<8} {models}")


def print_models(models: list[dict[str, Any]]) -> None:
    print(f"{'MODEL':<32} NODES")
    for m in models:
        print(f"{m['id']:<32} {', '.join(m['nodes'])}")


def answer_or_say(args: argparse.Namespace, request: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The node's answer to `args.command`, or None once what went wrong is printed."""
    try:
        data = query(args.node, args.command, args.timeout, request)
    except PeerUnavailable as err:
        print(f"mesh-ctl: {_why(err)}", file=sys.stderr)
        return None
    if "error" in data:
        print(f"mesh-ctl: {data['error']}", file=sys.stderr)
        return None
    return data


def run_node_command(args: argparse.Namespace) -> int:
    data = answer_or_say(args)
    if data is None:
        return 1
    shown = data if args.command == "status" else data.get(args.command)
    if args.json:
        print(json.dumps(shown, indent=2))
    else:
        printers = {
            "status": print_status,
            "peers": print_peers,
            "models": print_models,
            "splits": print_splits,
        }
        printers[args.command](shown)  # type: ignore[operator]
    return 0


def run_synth(args: argparse.Namespace) -> int:
    overrides = {field: getattr(args, flag) for flag, field in _SHAPE_FLAGS.items()}
    try:
        shape = shape_for(args.arch, args.preset, **overrides)
        path = synthesize(
            args.arch,
            args.out,
            shape,
            dtype=args.type,
            seed=args.seed,
            router_skew=args.router_skew,
            add_bos=not args.no_bos,
        )
    except ValueError as err:
        print(f"mesh-ctl: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {args.arch}, RANDOM WEIGHTS: for tests and demos)"
    )
    return 0


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts is None:
        return list(CALIBRATION_PROMPTS)
    prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{args.prompts} holds no prompts (one per line)")
    return prompts


def run_moe(args: argparse.Namespace) -> int:
    try:
        if not args.model.is_file():
            raise ValueError(f"model file {args.model} does not exist")
        prompts = _prompts(args)
        if args.moe_command == "analyze":
            return _analyze(args, prompts)
        result = split_model(
            args.model,
            args.out,
            nodes=args.nodes,
            replicate=args.replicate,
            gate=Gate(min_agreement=args.min_agreement, max_kl=args.max_kl),
            prompts=prompts,
            weights_only=args.weights_only,
            force=args.force,
            n_threads=args.threads,
            progress=stderr_progress,
        )
    except (UnsupportedModel, ValueError, OSError) as err:
        print(f"mesh-ctl: {err}", file=sys.stderr)
        return 2
    m = result.manifest
    print(f"\nsplit {m['source_model_id']} into {m['nodes']} shards ({m['importance']})")
    print(f"{'SHARD':<40} {'EXPERTS':>7} {'TOP-1':>6} {'KL':>7}  GATE")
    for row in m["shards"]:
        verdict = "pass" if row["passes"] else "FAIL"
        print(
            f"{row['file']:<40} {row['experts_per_layer']:>7} {row['top1_agreement']:>6.3f}"
            f" {row['mean_kl']:>7.3f}  {verdict}"
        )
    if not result.accepted and not args.force:
        gate = m["gate"]
        print(
            f"mesh-ctl: refused: a shard is below the fidelity floor (top-1 >= {gate['min_agreement']}, "
            f"KL <= {gate['max_kl']}); use fewer nodes or a larger --replicate, or --force. "
            f"Figures in {args.out / 'manifest.json'}",
            file=sys.stderr,
        )
        return 3
    print(f"manifest: {args.out / 'manifest.json'}")
    return 0


def _analyze(args: argparse.Namespace, prompts: list[str]) -> int:
    info = moe_info(args.model)
    method = "weights"
    if args.weights_only:
        importance = weight_importance(args.model)
    else:
        try:
            importance = activation_importance(args.model, prompts, n_threads=args.threads)
            method = "activations"
        except RuntimeError as err:
            print(f"mesh-ctl: activation analysis failed ({err}); using weights only", file=sys.stderr)
            importance = weight_importance(args.model)
    if args.json:
        doc = {
            "model": info.model_id,
            "arch": info.arch,
            "n_expert": info.n_expert,
            "n_expert_used": info.n_expert_used,
            "method": method,
            "prompts": len(prompts) if method == "activations" else 0,
            "importance": [[round(float(x), 5) for x in row] for row in importance],
        }
        print(json.dumps(doc, indent=2))
        return 0
    note = "" if method == "activations" else "  (WEIGHT-ONLY ESTIMATE: no activations measured)"
    print(f"{info.model_id}: {info.arch}, {info.n_expert} experts, {info.n_expert_used} used per token{note}")
    print(f"importance by {method}" + (f" over {len(prompts)} prompts" if method == "activations" else ""))
    for layer, row in enumerate(importance):
        top = sorted(range(len(row)), key=lambda e: -row[e])[:4]
        shares = "  ".join(f"e{e}:{row[e]:.2f}" for e in top)
        print(f"  layer {layer:>3}  top: {shares}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.state_dir is not None:
        try:
            _credentials.append(credentials(args.state_dir, args.node))
        except TrustError as err:
            print(f"mesh-ctl: {err}", file=sys.stderr)
            return 1
    if args.command in ("invite", "revoke"):
        return run_trust_command(args)
    if args.command == "model" and args.model_command == "swap":
        path = str(args.path.resolve())
        return run_operation(args.node, "swap", {"path": path}, args.wait, args.timeout)
    if args.command == "model":
        return run_synth(args)
    if args.command == "drain":
        return run_operation(args.node, "drain", {"leave": args.leave}, args.wait, args.timeout)
    if args.command == "promote":
        return run_operation(args.node, "promote", {"model": args.model}, args.wait, args.timeout)
    if args.command == "rollout":
        return run_rollout(args)
    if args.command == "moe":
        return run_moe(args)
    return run_node_command(args)

"""`mesh-ctl`: operate a node over ZeroMQ, and the GGUF tooling."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import zmq

from actors import ARCHS, PRESETS, PeerUnavailable, ask, shape_for, synthesize

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
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("status", "this node and its peers"),
        ("peers", "the peers this node knows"),
        ("models", "models the mesh serves"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--json", action="store_true", help="print JSON")
    model = sub.add_parser("model", help="model tooling").add_subparsers(dest="model_command", required=True)
    synth = model.add_parser("synth", help="write a GGUF with random weights (for tests and demos)")
    synth.add_argument("--arch", choices=ARCHS, required=True)
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="base shape (default tiny)")
    for flag in _SHAPE_FLAGS:
        synth.add_argument(f"--{flag.replace('_', '-')}", type=int, dest=flag)
    synth.add_argument("--type", choices=("f32", "f16", "q8_0"), default="f16", help="weight type")
    synth.add_argument("--seed", type=int, default=0)
    return parser


def query(node: str, what: str, timeout_s: float) -> dict[str, Any]:
    ctx = zmq.Context()
    try:
        return ask(ctx, node, what, timeout_s=timeout_s)
    finally:
        ctx.term()


def print_status(data: dict[str, Any]) -> None:
    print(f"node     {data['node_id']}  (mesh {data['mesh']}, role {data['role']}, v{data['version']})")
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
    print("requests " + "  ".join(f"{k} {v}" for k, v in reqs.items()) + f"  in-flight {data['in_flight']}")
    print_peers(data["peers"])


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


def run_node_command(args: argparse.Namespace) -> int:
    try:
        data = query(args.node, args.command, args.timeout)
    except PeerUnavailable as err:
        print(f"mesh-ctl: {err} (is a node running there?)", file=sys.stderr)
        return 1
    if "error" in data:
        print(f"mesh-ctl: {data['error']}", file=sys.stderr)
        return 1
    shown = {"status": data, "peers": data.get("peers"), "models": data.get("models")}[args.command]
    if args.json:
        print(json.dumps(shown, indent=2))
    else:
        {"status": print_status, "peers": print_peers, "models": print_models}[args.command](shown)  # type: ignore[operator]
    return 0


def run_synth(args: argparse.Namespace) -> int:
    overrides = {field: getattr(args, flag) for flag, field in _SHAPE_FLAGS.items()}
    try:
        shape = shape_for(args.arch, args.preset, **overrides)
        path = synthesize(args.arch, args.out, shape, dtype=args.type, seed=args.seed)
    except ValueError as err:
        print(f"mesh-ctl: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {args.arch}, RANDOM WEIGHTS: for tests and demos)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "model":
        return run_synth(args)
    return run_node_command(args)

"""`mesh-llm`: run a node (its actors, plus gunicorn serving the HTTP API)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from actors import ZMQ_PORT_SPAN, ActorStartError, ModelSpec, Node, NodeConfig, NodeSpec
from actors._config import MAX_BODY_BYTES
from actors.engine._llamacpp import has_file_tensors
from actors.gguf._identity import check_draft, check_file, check_model
from actors.gguf._layout import Layout
from actors.runtime._supervisor import ChildProcess
from actors.wire._sockets import private_ipc
from discovery import MeshMembership
from discovery._admission import Admission, enrol
from discovery._trust import Invite, Trust, TrustError, TrustFiles
from gateway.cli._models import default_model
from gateway.cli._operator import Operator
from gateway.cli._state import StateDir, StateDirError, default_state_dir

log = logging.getLogger("mesh_llm")
_GUNICORN_START_TIMEOUT_S = 30.0
_RESTART = -1  # `_serve` asks to be run again (with a fresh node id)
GIB = 1024**3
STREAM_INTERVAL_MS = 100.0  # 10 updates a second to a reader; ~17 tokens a frame at 170 tok/s


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mesh-llm", description="Pool machines into one OpenAI-compatible endpoint."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a node that serves a model")
    serve.add_argument(
        "--model", type=Path, help="GGUF to serve (default: a built-in demo model with random weights)"
    )
    serve.add_argument(
        "--standby",
        action="store_true",
        help="hold --model (or the GGUFs of --models-dir) without loading it: serve the API as a "
        "client, load the model when the mesh's unmet demand for it persists, step back when it is gone",
    )
    serve.add_argument(
        "--promote-after", type=float, metavar="S", default=NodeConfig().promote_after_s,
        help="seconds unmet demand must last before a standby promotes",
    )  # fmt: skip
    serve.add_argument(
        "--step-back-after", type=float, metavar="S", default=NodeConfig().step_back_after_s,
        help="seconds without demand before a promoted standby steps back",
    )  # fmt: skip
    serve.add_argument(
        "--alias", action="append", default=[], type=_alias, metavar="NAME",
        help="another name clients may ask for the model by (repeatable); listed in /v1/models",
    )  # fmt: skip
    serve.add_argument(
        "--draft", type=Path, help="a small draft GGUF with the same vocabulary: speculative decoding"
    )
    serve.add_argument(
        "--lookup",
        action="store_true",
        help="prompt-lookup drafting for greedy requests (without --draft; a request may ask with "
        '"speculative": "lookup")',
    )
    serve.add_argument("--ctx", type=int, default=4096, help="context length in tokens")
    serve.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads")
    serve.add_argument("--slots", type=int, default=4, help="requests decoded together (continuous batching)")
    serve.add_argument(
        "--stream-interval", type=_milliseconds, metavar="MS", default=STREAM_INTERVAL_MS,
        help="a stream's tokens after its first are sent at most this often, several to a frame "
        "(0: every token as it comes; each frame costs CPU that a small machine takes from decoding)",
    )  # fmt: skip
    serve.add_argument(
        "--max-memory",
        type=float,
        metavar="GB",
        help="memory this node offers for weights and KV cache (default: physical memory minus a reserve); "
        "a model that needs more is split by layers over peers holding the same GGUF",
    )
    serve.add_argument(
        "--models-dir",
        type=Path,
        help="GGUFs this node holds for dense splits of other nodes (every *.gguf below it); "
        "without --model the node serves none itself",
    )
    serve.add_argument("--split", action="store_true", help="split the model over peers even if it fits here")
    serve.add_argument(
        "--split-load",
        choices=("auto", "file", "hash-cache", "transfer"),
        default="auto",
        help="how stages load their layers: read from their own copy of the GGUF (file: needs the "
        "project's llama.cpp patch at both ends), from RPC cache files built from it (hash-cache: "
        "stock llama.cpp), or by receiving every byte (transfer); auto (default) takes the best each "
        "stage can",
    )
    client = sub.add_parser("client", help="run a node without a model: the API, served by the mesh")
    for cmd in (serve, client):
        _node_options(cmd)
    return parser


def _node_options(cmd: argparse.ArgumentParser) -> None:
    """Options of every node, serving or not."""
    cmd.add_argument(
        "--queue-depth",
        type=int,
        default=NodeConfig().queue_depth_per_model,
        help="requests per model waiting here (for this node's engines, or for a busy mesh) before 429",
    )
    cmd.add_argument("--mesh", default="default", help="mesh name; nodes join only meshes of their name")
    cmd.add_argument("--host", default="127.0.0.1", help="address to bind and advertise (default 127.0.0.1)")
    cmd.add_argument("--http-port", type=int, default=9337)
    cmd.add_argument(
        "--zmq-port",
        type=int,
        default=9338,
        help="first of four ZeroMQ ports: control, router, gossip, split tunnel",
    )
    cmd.add_argument(
        "--peer", action="append", default=[], type=_host_port, metavar="HOST:ZMQPORT",
        help="a node to join without mDNS (repeatable)",
    )  # fmt: skip
    cmd.add_argument("--no-mdns", action="store_true", help="do not advertise or browse mDNS")
    cmd.add_argument(
        "--advertise", type=_host_port, metavar="HOST:ZMQPORT",
        help="where peers reach this node, if not at --host/--zmq-port (a port forward); gossip carries it",
    )  # fmt: skip
    cmd.add_argument(
        "--max-rtt-ms", type=float, default=NodeConfig().max_rtt_ms, help="farther peers take no work from us"
    )
    cmd.add_argument(
        "--api-key", action="append", default=[], metavar="KEY",
        help="require this bearer key on the HTTP API (repeatable: any one opens it; also $MESH_LLM_API_KEY)",
    )  # fmt: skip
    cmd.add_argument("--api-key-file", type=Path, metavar="PATH", help="more API keys, one per line")
    cmd.add_argument(
        "--secure", action="store_true",
        help="a secured mesh: only invited nodes may connect (CURVE); the first such node creates the "
        "mesh's credentials in its --state-dir, `mesh-ctl invite` makes tokens for others",
    )  # fmt: skip
    cmd.add_argument(
        "--join", metavar="TOKEN",
        help="join the secured mesh of this invite token (from `mesh-ctl invite`); remembered in --state-dir",
    )  # fmt: skip
    cmd.add_argument(
        "--state-dir",
        type=Path,
        help="where the node keeps its id, one per running node "
        "(default ~/.local/state/mesh-llm/node-ZMQPORT)",
    )
    cmd.add_argument(
        "--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="larger request bodies get 413"
    )
    cmd.add_argument(
        "--http-connections", type=int, default=1024, help="open HTTP connections before new ones get 503"
    )
    cmd.add_argument(
        "--cors-origin", action="append", default=[], type=_origin, metavar="ORIGIN",
        help="a browser origin (scheme://host[:port], or *) allowed to call the API (repeatable)",
    )  # fmt: skip
    cmd.add_argument("-v", "--verbose", action="store_true")


def _milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of milliseconds") from None
    if not 0 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"{text} ms is not between 0 and 1000")
    return value


def _alias(text: str) -> str:
    if not text or len(text) > 256 or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"a model alias is 1-256 characters without spaces, not {text!r}")
    return text


def _origin(text: str) -> str:
    if text == "*":
        return text
    scheme, sep, rest = text.partition("://")
    if scheme not in ("http", "https") or not sep or not rest or "/" in rest or " " in rest:
        raise argparse.ArgumentTypeError(
            f"expected an origin such as https://app.example:8080 or *, got {text!r}"
        )
    return text


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:ZMQPORT, got {text!r}")
    return host, int(port)


def serve(args: argparse.Namespace) -> int:
    if args.zmq_port <= args.http_port < args.zmq_port + ZMQ_PORT_SPAN:
        print(
            f"mesh-llm: --http-port {args.http_port} is one of this node's ZeroMQ ports "
            f"({args.zmq_port}-{args.zmq_port + ZMQ_PORT_SPAN - 1}, from --zmq-port); choose another",
            file=sys.stderr,
        )
        return 2
    models: list[ModelSpec] = []
    holdings: list[Layout] = []
    if args.command == "serve":
        try:
            if args.max_memory is not None and not args.max_memory > 0:
                raise ValueError(f"--max-memory must be a positive number of GB, not {args.max_memory}")
            if args.models_dir is not None and not args.models_dir.is_dir():
                raise ValueError(f"--models-dir {args.models_dir} is not a directory")
            if args.models_dir and not args.model and (args.draft or args.split or args.alias):
                raise ValueError("--draft, --split and --alias need --model")
            if args.standby and args.split:
                raise ValueError("--standby and --split do not go together")
            if not args.promote_after >= 0 or not args.step_back_after >= 0:
                raise ValueError("--promote-after and --step-back-after are seconds, at least 0")
            if args.split_load == "file" and not has_file_tensors():
                raise ValueError(
                    "--split-load file needs llama.cpp built with the project's RPC patch (make install); "
                    "this one lacks it"
                )
            holdings = _holdings(args.models_dir) if args.models_dir else []
            if args.model or not args.models_dir:
                model = args.model or default_model()
                check_file(model)
                layout = _layout(model)  # one read of the file: its layers, identity and model id
                model_id = layout.model_id if layout is not None else check_model(model)
                if args.draft:
                    check_draft(model, args.draft)
                speculative = "draft" if args.draft else "lookup" if args.lookup else ""
                draft = str(args.draft) if args.draft else None
                if layout is not None and all(h.identity != layout.identity for h in holdings):
                    holdings.append(layout)
                models.append(
                    ModelSpec(
                        source=str(model),
                        model_id=model_id,
                        draft=draft,
                        speculative=speculative,
                        layout=layout,
                        aliases=_aliases(args.alias, model_id),
                    )
                )
        except ValueError as err:
            print(f"mesh-llm: {err}", file=sys.stderr)
            return 2
    try:
        api_keys = _api_keys(args)
    except ValueError as err:
        print(f"mesh-llm: {err}", file=sys.stderr)
        return 2
    try:
        state = StateDir(args.state_dir or default_state_dir(args.zmq_port))
        node_id = state.node_id()
    except StateDirError as err:
        print(f"mesh-llm: {err}", file=sys.stderr)
        return 1
    try:
        try:
            trust = _trust(args, state.path, node_id)
        except TrustError as err:
            print(f"mesh-llm: {err}", file=sys.stderr)
            return 1
        rc = _serve(args, models, holdings, node_id, state.path, trust, api_keys)
        if rc == _RESTART and trust is not None:
            print(
                f"mesh-llm: another node uses this node's id {node_id} and key (a copied --state-dir?); "
                "a member's id is bound to its key, so this one stops",
                file=sys.stderr,
            )
            return 1
        if rc == _RESTART:  # another live node has our id: take a fresh one and start again
            print(f"mesh-llm: node id {node_id} is in use elsewhere; taking a fresh id", file=sys.stderr)
            state.renew_node_id()
        return rc
    finally:
        state.close()


def _api_keys(args: argparse.Namespace) -> frozenset[str]:
    """--api-key (repeated), --api-key-file's lines, $MESH_LLM_API_KEY; each checked."""
    keys = list(args.api_key)
    if os.environ.get("MESH_LLM_API_KEY"):
        keys.append(os.environ["MESH_LLM_API_KEY"])
    if args.api_key_file is not None:
        try:
            lines = args.api_key_file.read_text().splitlines()
        except OSError as err:
            raise ValueError(f"cannot read --api-key-file {args.api_key_file}: {err.strerror}") from err
        keys += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        if not any(line.strip() for line in lines):
            raise ValueError(f"--api-key-file {args.api_key_file} holds no key")
    for key in keys:
        if not key or any(c.isspace() for c in key) or not key.isprintable():
            raise ValueError("an API key is printable text without spaces")
    return frozenset(keys)


def _trust(args: argparse.Namespace, state_dir: Path, node_id: str) -> Trust | None:
    """The node's credentials if it belongs to a secured mesh: made (--secure, first node),
    obtained (--join), or kept from before in its state dir. None: an open node."""
    files = TrustFiles(state_dir, node_id)
    host, zmq_port = args.advertise or (args.host, args.zmq_port)
    if args.join:
        invite = Invite.parse(args.join)
        if args.mesh not in ("default", invite.mesh):
            raise TrustError(f"the invite is for mesh {invite.mesh!r}, not --mesh {args.mesh!r}")
        if (
            files.exists()
            and files.mesh()["mesh"] == invite.mesh
            and files.authority_public() == invite.authority
        ):
            log.info("already a member of mesh %s: the invite is not used again", invite.mesh)
        else:
            roster = enrol(args.join, files, host=host, zmq_port=zmq_port)
            print(f"mesh-llm: joined secured mesh {roster.mesh} ({len(roster.members)} members)", flush=True)
    elif args.secure and not files.exists():
        files.create_mesh(args.mesh, host, zmq_port)
        print(f"mesh-llm: created secured mesh {args.mesh}; its credentials are in {files.dir}", flush=True)
    if not files.exists():
        return None
    mesh = files.mesh()["mesh"]
    if args.mesh not in ("default", mesh):
        raise TrustError(
            f"the state directory {state_dir} holds the credentials of mesh {mesh!r}, not {args.mesh!r}"
        )
    if not (args.secure or args.join):
        log.info("%s holds this node's credentials for secured mesh %s: running secured", files.dir, mesh)
    args.mesh = mesh
    return Trust(files)


def _aliases(names: list[str], model_id: str) -> tuple[str, ...]:
    if model_id in names:
        raise ValueError(f"--alias {model_id} is the model's own id")
    return tuple(dict.fromkeys(names))


def _serve(
    args: argparse.Namespace,
    models: list[ModelSpec],
    holdings: list[Layout],
    node_id: str,
    state_dir: Path,
    trust: Trust | None,
    api_keys: frozenset[str],
) -> int:
    max_memory = args.max_memory if getattr(args, "max_memory", None) else default_max_memory_gb()
    standby: list[ModelSpec] = []
    if getattr(args, "standby", False):  # --model, else every whole GGUF of --models-dir
        standby = models or [ModelSpec(source=h.path, model_id=h.model_id, layout=h) for h in holdings]
        models = []
    defaults = NodeConfig()
    step_back = getattr(args, "step_back_after", defaults.step_back_after_s)
    config = NodeConfig(
        queue_depth_per_model=getattr(args, "queue_depth", defaults.queue_depth_per_model),
        max_rtt_ms=args.max_rtt_ms,
        promote_after_s=getattr(args, "promote_after", defaults.promote_after_s),
        step_back_after_s=step_back,
        min_serving_s=min(defaults.min_serving_s, step_back),
    )
    spec = NodeSpec(
        node_id=node_id,
        mesh=args.mesh,
        host=args.host,
        http_port=args.http_port,
        zmq_port=args.zmq_port,
        models=models,
        role="serving" if models else "standby" if holdings or standby else "client",
        n_ctx=getattr(args, "ctx", 4096),
        n_threads=getattr(args, "threads", 1),
        slots=getattr(args, "slots", 1),
        stream_interval_ms=getattr(args, "stream_interval", 0.0),
        config=config,
        max_memory_bytes=int(max_memory * GIB) if args.command == "serve" else 0,
        holdings=holdings,
        split=getattr(args, "split", False),
        split_load=getattr(args, "split_load", "auto"),
        work_dir=state_dir,
        gateway_endpoint=_gateway_endpoint(args.zmq_port),
        api_keys=api_keys,
    )
    collided, leave = threading.Event(), threading.Event()
    operators: list[Operator] = []  # made once the node is: its actors call it through these
    mesh = MeshMembership(
        spec,
        mdns=not args.no_mdns,
        seeds=args.peer,
        advertise=args.advertise,
        on_collision=lambda _: collided.set(),
        standby_for=[m.model_id for m in standby],
        on_elastic=lambda action, model: operators[0].elastic(action, model) if operators else None,
        trust=trust,
    )
    advertised = args.advertise or (args.host, args.zmq_port)
    admission = Admission(trust, host=advertised[0], zmq_port=advertised[1]) if trust is not None else None
    node = Node(
        spec,
        more=[mesh.actor],
        peers_endpoint=mesh.query_endpoint,
        inbox_endpoint=mesh.inbox_endpoint,
        operations=lambda what, a: operators[0].command(what, a) if operators else {"error": "starting up"},
        keyring=trust.keyring if trust is not None else None,
        trust=admission.command if admission is not None else None,
    )
    if trust is None:
        log.warning(
            "OPEN MESH: any host on this LAN can join mesh %r, serve its users and read their prompts; "
            "on a LAN you do not trust, start the first node with --secure and the others with --join TOKEN",
            spec.mesh,
        )
    try:
        node.start()
    except ActorStartError as err:
        print(f"mesh-llm: cannot start the node: {err}", file=sys.stderr)
        return 1
    assert mesh.gossip is not None
    operators.append(Operator(node, mesh.gossip, standby, on_leave=leave.set).start())
    gateway = ChildProcess(_gunicorn_argv(args), env=_gunicorn_env(args, spec), group=True)
    try:
        return _run(node, gateway, mesh, args, collided, leave)
    finally:
        operators[0].stop()
        mesh.close()
        gateway.close()
        node.stop()


def _run(
    node: Node,
    gateway: ChildProcess,
    mesh: MeshMembership,
    args: argparse.Namespace,
    collided: threading.Event,
    leave: threading.Event,
) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        socket.create_server((args.host, args.http_port)).close()
    except OSError as err:
        print(f"mesh-llm: cannot listen on {args.host}:{args.http_port}: {err}", file=sys.stderr)
        return 1
    gateway.start()
    if not _wait_listening(args.host, args.http_port, gateway):
        print(f"mesh-llm: the HTTP gateway could not listen on {args.host}:{args.http_port}", file=sys.stderr)
        return 1
    mesh.start_discovery(node)
    spec = node.spec
    what = (
        f"serving {spec.models[0].model_id}"
        if spec.models
        else f"standby for {', '.join(mesh.standby_for)}"
        if mesh.standby_for
        else f"standby: {len(spec.holdings)} GGUF(s) for splits"
        if spec.holdings
        else "client of the mesh"
    )
    print(
        f"mesh-llm node {spec.node_id} ({what}, mesh {spec.mesh}) on http://{args.host}:{args.http_port}/v1"
        f"  (mesh-ctl --node {spec.control_endpoint} status)",
        flush=True,
    )
    while not stop.wait(0.5):
        if leave.is_set():
            log.info("drained: leaving the mesh")
            return 0
        if collided.is_set():
            return _RESTART
        if gateway.exit_code() is not None:
            print(f"mesh-llm: the HTTP gateway exited with code {gateway.exit_code()}", file=sys.stderr)
            return 1
    log.info("stopping")
    return 0


def default_max_memory_gb() -> float:
    """Physical memory minus a reserve for the system (a tenth, at least 1 GiB). No GPU backend is
    built here, so there is no VRAM to add."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(0.0, total - max(GIB, total / 10)) / GIB


def _layout(path: Path) -> Layout | None:
    """A GGUF's layout for split planning; None (with a warning) for one that has no layers."""
    from actors.gguf._layout import read_layout

    try:
        return read_layout(path)
    except ValueError as err:
        log.warning("%s cannot be split by layers: %s", path, err)
        return None


def _holdings(models_dir: Path) -> list[Layout]:
    found = [_layout(p) for p in sorted(models_dir.rglob("*.gguf")) if p.is_file()]
    holdings = [h for h in found if h is not None]
    log.info("holding %d GGUF(s) under %s for dense splits", len(holdings), models_dir)
    return holdings


def _gunicorn_argv(args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, "-m", "gunicorn",
        "--worker-class", "gateway.http._worker.MeshWorker",
        "--workers", "1",
        "--bind", f"{args.host}:{args.http_port}",
        "--graceful-timeout", "5",
        "--keep-alive", "5",
        "--log-level", "debug" if args.verbose else "warning",
        "--config", "python:gateway.http._gunicorn_conf",
        "gateway:get_app()",
    ]  # fmt: skip


def _gunicorn_env(args: argparse.Namespace, spec: NodeSpec) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MESH_LLM_ROUTER=spec.gateway_endpoint or spec.router_endpoint,
        MESH_LLM_NODE_ID=spec.node_id,
        MESH_LLM_MAX_BODY_BYTES=str(args.max_body_bytes),
        MESH_LLM_IDLE_TIMEOUT_S=str(spec.config.gateway_idle_timeout_s),
        MESH_LLM_MAX_FRAME_BYTES=str(spec.config.max_frame_bytes),
        MESH_LLM_HTTP_CONNECTIONS=str(args.http_connections),
        MESH_LLM_API_KEYS="\n".join(sorted(spec.api_keys)),
        MESH_LLM_CORS_ORIGINS=" ".join(args.cors_origin),
        MESH_LLM_PARENT_PID=str(os.getpid()),
    )
    return env


def _gateway_endpoint(zmq_port: int) -> str:
    """Where the node's own HTTP gateway reaches its router: an ipc socket in a directory only
    this user can enter, so that the LAN-facing router port can serve members only."""
    return private_ipc(f"router-{zmq_port}")


def _wait_listening(host: str, port: int, gateway: ChildProcess) -> bool:
    deadline = time.monotonic() + _GUNICORN_START_TIMEOUT_S
    while time.monotonic() < deadline and gateway.exit_code() is None:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer narrates every file at INFO
    while (rc := serve(args)) == _RESTART:
        pass
    return rc

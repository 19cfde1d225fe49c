"""Dense layer splits over llama.cpp RPC, measured with real nodes in network namespaces on a bridge
whose every host sends at most 1 Gbit/s (tc tbf):

  (a) join    time from the split being decided to the head serving, the bytes that crossed and
              the head's CPU time, for llama.cpp's stock path (`--split-load transfer`), stage-built
              hash cache files (`hash-cache`) and the project's patch (`file`: stages read their
              tensors from their own GGUF), on a wide model (per-layer matrices over 10 MiB,
              >= 1.5 GB) and a small-tensor model; and `file` on a wide model twice as big
  (b) decode  tok/s of 2- and 3-stage splits vs the model whole on one node (one streaming client,
              interleaved rounds); RPC round trips and bytes per token through the tunnels; ms per
              token added per ms of RTT (a TCP delay proxy between head and stage on loopback)
  (c) tunnel  ms per token with the head's llama.cpp reaching the stage's RPC server through the
              mesh's ZeroMQ tunnel vs directly over TCP (same process, same model, same layers)
  (d) faults  kill -9 of the serving stage during 20 streamed requests (a spare stage waits):
              lost, hung, truncated; the time the head took to re-plan and serve again

All models are synthesized with random weights. Writes bench/results/split.json; needs root.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import zmq

from actors import Actor, NodeConfig, encode
from actors.gguf import shape_for, synthesize
from actors.gguf._layout import Layout, read_layout
from actors.splits._plan import OVERHEAD_BYTES, need_of
from actors.splits._tunnel import HeadEnd, parse_tunnel
from actors.wire import decode
from actors.wire._messages import StageClaim, StageGrant
from bench._common import cpu_seconds, free_port_pair, print_targets, stop_process, write_result
from tests.support.delay_proxy import DelayProxy
from tests.support.netns import Lan, can_make_namespaces, mesh_ctl, run_in
from tests.support.nodes import listening

BIN = Path(sys.executable).parent
MODELS = Path.home() / ".cache" / "mesh-llm" / "bench-models"
ZMQ, HTTP = 9338, 9337
CTX = ["--ctx", "1024", "--slots", "1", "--threads", "1"]
PROMPT = "Once upon a time in a mesh"
GIB = 1024**3


def model(name: str, make: Callable[[Path], Path]) -> Path:
    MODELS.mkdir(parents=True, exist_ok=True)
    path = MODELS / f"{name}.gguf"
    if not path.exists():
        print(f"synthesizing {path} ...", flush=True)
        make(path)
    return path


def wide_model() -> Path:
    """Llama-7B-shaped layers (every matrix over 10 MiB), four of them: about 1.7 GB of f16."""
    shape = shape_for(
        "llama", "tiny", n_vocab=8000, n_embd=4096, n_layer=4, n_head=32, n_head_kv=32, n_ff=11008
    )
    return model("split-wide", lambda p: synthesize("llama", p, shape, seed=11))


def wider_model() -> Path:
    """The wide model's layers, eight of them: about 3.4 GB (for how `file` joins scale)."""
    shape = shape_for(
        "llama", "tiny", n_vocab=8000, n_embd=4096, n_layer=8, n_head=32, n_head_kv=32, n_ff=11008
    )
    return model("split-wide-8l", lambda p: synthesize("llama", p, shape, seed=14))


def narrow_model() -> Path:
    """300M parameters in Q8_0: every tensor under 10 MiB, so the stock hash cache saves nothing."""
    return model(
        "split-300m-q8", lambda p: synthesize("llama", p, shape_for("llama", "300m"), dtype="q8_0", seed=12)
    )


def decode_model() -> Path:
    return narrow_model()


def small_model() -> Path:
    return model("split-small", lambda p: synthesize("llama", p, shape_for("llama", "small"), seed=13))


def models_dir(work: Path, name: str, model: Path) -> Path:
    """A `--models-dir` holding `model` (a link to it: every node's "own copy" on this machine)."""
    folder = work / name
    folder.mkdir(exist_ok=True)
    if not (folder / model.name).exists():
        (folder / model.name).symlink_to(model)
    return folder


# -- nodes in namespaces ---------------------------------------------------------------------------


class Host:
    """A `mesh-llm serve` in a namespace of `lan`, on the default ports of its own address."""

    def __init__(self, lan: Lan, work: Path, *args: str, rate: str = "1gbit") -> None:
        self.lan = lan
        self.ns, self.address = lan.add_host()
        lan.limit(self.ns, rate)
        self.log = work / f"{self.ns}.log"
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.work = work

    def start(self, *more: str) -> Host:
        argv = [
            "ip", "netns", "exec", self.ns, str(BIN / "mesh-llm"), "serve", "--host", self.address,
            "--zmq-port", str(ZMQ), "--http-port", str(HTTP), "--no-mdns",
            "--state-dir", str(self.work / f"state-{self.ns}"), *self.args, *more,
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        return self

    def ctl(self, *args: str) -> Any:
        done = mesh_ctl(self.ns, self.address, *args, "--json", zmq_port=ZMQ)
        return json.loads(done.stdout) if done.returncode == 0 else None

    def split(self) -> dict[str, Any] | None:
        rows = self.ctl("splits") or []
        return next((r for r in rows if r["head"] == (self.ctl("status") or {}).get("node_id")), None)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)  # type: ignore[arg-type]

    def http(self, call: Callable[[httpx.Client], Any]) -> Any:
        """`call(client)` with an HTTP client whose connections start in the head's namespace."""

        def run() -> Any:
            with httpx.Client(base_url=f"http://{self.address}:{HTTP}", timeout=300) as client:
                return call(client)

        return run_in(self.ns, run)

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU time (user + system) so far of the node's engine child, and of all its processes."""
        assert self.proc is not None
        pid = self.proc.pid
        return round(cpu_seconds(pid, b"actors.engine._child"), 2), round(cpu_seconds(pid), 2)

    def log_times(self, pattern: str) -> list[float]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if re.search(pattern, line):
                out.append(datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp())
        return out


def wait(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - start


def serving(head: Host) -> bool:
    row = head.split()
    if row is not None and row["state"] == "failed":
        raise RuntimeError(f"the split failed: {row['detail']}")
    return row is not None and row["state"] == "serving"


def stream_tokens(
    client: httpx.Client, model_id: str, max_tokens: int, prompt: str = PROMPT
) -> tuple[float, int]:
    """Seconds from the first token to the last, and the tokens streamed after the first."""
    body = {"model": model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    first = last = 0.0
    tokens = 0
    with client.stream("POST", "/v1/completions", json=body) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                data = json.loads(line[6:])
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
                elif data["choices"] and not first:
                    first = time.monotonic()
                last = time.monotonic()
    return last - first, tokens - 1


def memory_args(layout: Layout, share: float) -> list[str]:
    """--max-memory that holds about `share` of the model's layers (plus what a node always needs)."""
    need = need_of(layout, 1024)
    fixed = layout.input_bytes + layout.output_bytes + OVERHEAD_BYTES
    return ["--max-memory", f"{(fixed + share * sum(need.layers)) / GIB:.4f}"]


# -- (a) join -------------------------------------------------------------------------------------


def join(work: Path, path: Path, mode: str) -> dict[str, Any]:
    lan = Lan()
    try:
        folder = models_dir(work, f"models-{path.stem}", path)
        stage = Host(lan, work, "--models-dir", str(folder), *CTX[-2:]).start()
        head = Host(lan, work, "--model", str(path), "--split", "--split-load", mode, *CTX)
        wait(lambda: stage.ctl("status") is not None, 60, "the stage node")
        sent_before = lan.tx_bytes(head.ns)
        head.start("--peer", f"{stage.address}:{ZMQ}")
        wait(lambda: serving(head), 600, "the split to serve")
        sent = lan.tx_bytes(head.ns) - sent_before
        row = head.split()
        assert row is not None
        layout = read_layout(path)
        first, last = row["stages"][0]["layers"]
        weights = sum(layout.layer_bytes[first : last + 1])
        decided = head.log_times(r"split of .* \(split epoch 1\)")[0]
        answered = head.log_times(r"split of .* serving")[0]
        engine_cpu, tree_cpu = head.cpu_seconds()
        cache = re.search(r"ready in ([\d.]+) s; ([\d.]+) MB of RPC cache files", stage.log.read_text())
        loaded = re.search(r"stage \S+: (\d+) tensors \(([\d.]+) MB\) read from its own file, (\d+) tensors "
                           r"\(([\d.]+) MB\) sent", head.log.read_text())  # fmt: skip
        result = {
            "model": path.stem,
            "model_bytes": layout.size,
            "mode": mode,
            "join_s": round(answered - decided, 2),
            "stage_layers": [first, last],
            "stage_weight_bytes": weights,
            "tunnel_bytes_to_stage": row["bytes_crossed"],
            "link_bytes_from_head": sent,
            "crossed_fraction": round(row["bytes_crossed"] / weights, 4),
            "stage_ready_s": float(cache.group(1)) if cache else None,
            "stage_cache_mb": float(cache.group(2)) if cache else None,
            "stage_read_own_file_mb": float(loaded.group(2)) if loaded else None,
            "sent_to_stage_mb": float(loaded.group(4)) if loaded else None,
            "head_engine_cpu_s": engine_cpu,
            "head_node_cpu_s": tree_cpu,
        }
        print(f"  join {path.stem:<16} {mode:<10} {result['join_s']:>6.2f} s  "
              f"{row['bytes_crossed'] / 1e6:8.1f} MB crossed of {weights / 1e6:7.1f} MB "
              f"({result['crossed_fraction']:.2%}); head engine CPU {engine_cpu:.2f} s, "
              f"stage cache {result['stage_cache_mb']} MB", flush=True)  # fmt: skip
        head.stop()
        stage.stop()
        return result
    finally:
        lan.close()


# -- (b) decode -----------------------------------------------------------------------------------


def decode_rounds(work: Path, path: Path, rounds: int, tokens: int) -> dict[str, Any]:
    layout = read_layout(path)
    lan = Lan()
    made: list[Host] = []
    try:
        folder = models_dir(work, "models-decode", path)
        whole = Host(lan, work, "--model", str(path), "--mesh", "whole", *CTX).start()
        s2 = Host(lan, work, "--models-dir", str(folder), "--mesh", "two", *CTX[-2:]).start()
        h2 = Host(lan, work, "--model", str(path), "--mesh", "two", "--split", *CTX)
        s3 = [
            Host(
                lan,
                work,
                "--models-dir",
                str(folder),
                "--mesh",
                "three",
                *CTX[-2:],
                *memory_args(layout, 0.4),
            ).start()
            for _ in range(2)
        ]
        h3 = Host(lan, work, "--model", str(path), "--mesh", "three", *CTX, *memory_args(layout, 0.3))
        made += [whole, s2, h2, *s3, h3]
        wait(lambda: all(h.ctl("status") for h in (s2, *s3)), 60, "the stage nodes")
        h2.start("--peer", f"{s2.address}:{ZMQ}")
        h3.start(*[a for s in s3 for a in ("--peer", f"{s.address}:{ZMQ}")])
        wait(lambda: (whole.ctl("status") or {}).get("ready", False), 300, "the whole-model node")
        wait(lambda: serving(h2) and serving(h3), 600, "the splits")
        three = h3.split()
        assert three is not None and len(three["stages"]) == 3, three
        heads = {"whole": whole, "2-stage": h2, "3-stage": h3}
        model_id = path.stem
        for head in heads.values():
            head.http(lambda c: stream_tokens(c, model_id, 16))  # warm up
        speeds: dict[str, list[float]] = {k: [] for k in heads}
        per_token: dict[str, dict[str, float]] = {}
        for _ in range(rounds):
            for name, head in heads.items():
                before = head.split() if name != "whole" else None
                seconds, n = head.http(lambda c: stream_tokens(c, model_id, tokens))
                speeds[name].append(n / seconds)
                if before is not None:
                    time.sleep(1.3)  # the head publishes its tunnel counters once a second
                    after = head.split()
                    assert after is not None
                    per_token[name] = {
                        "round_trips": round((after["round_trips"] - before["round_trips"]) / (n + 1), 2),
                        "bytes_to_stages": round(
                            (after["tunnel_bytes_up"] - before["tunnel_bytes_up"]) / (n + 1)
                        ),
                        "bytes_from_stages": round(
                            (after["tunnel_bytes_down"] - before["tunnel_bytes_down"]) / (n + 1)
                        ),
                    }
        tok_s = {k: round(statistics.median(v), 2) for k, v in speeds.items()}
        for name in heads:
            print(f"  decode {name:<8} {tok_s[name]:7.2f} tok/s  {per_token.get(name, '')}", flush=True)
        return {
            "model": model_id,
            "tokens": tokens,
            "rounds": rounds,
            "tok_s": tok_s,
            "all_tok_s": speeds,
            "ratio_vs_whole": {k: round(v / tok_s["whole"], 3) for k, v in tok_s.items()},
            "per_token": per_token,
            "stages_3": three["stages"],
        }
    finally:
        for node in made:
            node.stop()
        lan.close()


def rtt_cost(work: Path, path: Path, tokens: int) -> dict[str, Any]:
    """Head and stage on loopback, the stage's ports behind a delay proxy (the head reaches it only
    through the proxy, gossip and tunnel alike)."""
    stage_port, proxy_port, head_port = free_port_pair(), free_port_pair(), free_port_pair()
    proxy = DelayProxy([(proxy_port + i, stage_port + i) for i in range(4)], delay_s=0.0)
    folder = models_dir(work, "models-rtt", path)
    common = ["--host", "127.0.0.1", "--no-mdns", "--mesh", "rtt"]
    stage = subprocess.Popen(
        [str(BIN / "mesh-llm"), "serve", *common, "--models-dir", str(folder), "--zmq-port", str(stage_port),
         "--http-port", str(free_port_pair(1)), "--advertise", f"127.0.0.1:{proxy_port}",
         "--state-dir", str(work / "rtt-stage"), *CTX[-2:]],
        stdout=(work / "rtt-stage.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    http_port = free_port_pair(1)
    head = subprocess.Popen(
        [str(BIN / "mesh-llm"), "serve", *common, "--model", str(path), "--split",
         "--zmq-port", str(head_port),
         "--http-port", str(http_port), "--peer", f"127.0.0.1:{proxy_port}", "--max-rtt-ms", "1000",
         "--state-dir", str(work / "rtt-head"), *CTX],
        stdout=(work / "rtt-head.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=300) as client:
            wait(lambda: _ok(client), 600, "the loopback split")
            stream_tokens(client, path.stem, 16)
            points = []
            for one_way_ms in (0.0, 1.0, 2.0, 4.0):
                proxy.delay_s = one_way_ms / 1000
                time.sleep(0.5)
                seconds, n = stream_tokens(client, path.stem, tokens)
                points.append((2 * one_way_ms, 1000 * seconds / n))
                print(f"  rtt +{2 * one_way_ms:4.1f} ms: {1000 * seconds / n:7.2f} ms/token", flush=True)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        slope = statistics.linear_regression(xs, ys).slope
        return {"points_rtt_ms_vs_ms_per_token": points, "ms_per_token_per_ms_rtt": round(slope, 3)}
    finally:
        stop_process(head)
        stop_process(stage)
        proxy.close()


def _ok(client: httpx.Client) -> bool:
    try:
        return client.get("/health").status_code == 200
    except httpx.HTTPError:
        return False


# -- (c) tunnel -----------------------------------------------------------------------------------


class TunnelHead(Actor):
    """The head's side of a split without the rest of a head: claims a lease on a stage node and
    opens the loopback tunnel port an engine in this process connects to."""

    def __init__(self, ctx: zmq.Context, *, stage: str, identity: str, first: int, last: int) -> None:
        super().__init__(ctx, "bench-head", config=NodeConfig())
        self.stage, self.identity, self.first, self.last = stage, identity, first, last
        self.epoch = 0
        self.ready = threading.Event()
        self.tunnel: HeadEnd | None = None
        self._link: zmq.Socket | None = None
        self._renew = 0.0

    def setup(self) -> None:
        self._link = self.socket(zmq.DEALER, identity=b"bench-head")
        self._link.setsockopt(zmq.SNDHWM, 0)
        self._link.connect(self.stage)
        self.on_socket(self._link, self._on_link)
        self._claim()

    def _claim(self) -> None:
        assert self._link is not None
        claim = StageClaim(request_id="b", head="bench-head", identity=self.identity, first=self.first,
                           last=self.last, load_mode="hash-cache", epoch=self.epoch)  # fmt: skip
        self._link.send(encode(claim))
        self._renew = self.clock() + 0.5

    def on_tick(self, now: float) -> None:
        if now >= self._renew:
            self._claim()

    def _on_link(self, frames: list[bytes]) -> None:
        parsed = parse_tunnel(frames)
        if parsed is not None:
            if self.tunnel is not None:
                self.tunnel.from_stage(parsed[1], parsed[2], parsed[3])
            return
        grant = decode(frames[-1])
        assert isinstance(grant, StageGrant) and grant.state != "refused", grant
        self.epoch = grant.epoch
        if grant.state == "ready" and self.tunnel is None:
            assert self._link is not None
            self.tunnel = HeadEnd(self, grant.epoch, self._link.send_multipart)
            self.ready.set()


def tunnel_vs_direct(work: Path, path: Path, rounds: int, tokens: int) -> dict[str, Any]:
    from actors.engine._llama import LlamaEngine
    from actors.wire._messages import Chunk, Generate

    layout = read_layout(path)
    half = layout.n_layer // 2
    split = [half, layout.n_layer - half + 1]  # the stage: layers 0..half-1; here: the rest + output
    port = free_port_pair(1)
    direct = subprocess.Popen(
        [sys.executable, "-m", "actors.engine._rpc_stage", "--listen", f"127.0.0.1:{port}",
         "--model", str(path),
         "--layers", f"0,{half - 1}", "--cache-dir", str(work / "direct-cache"), "--threads", "1",
         "--parent-pid", str(__import__("os").getpid())],
        stdout=(work / "direct-rpc.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    node_port = free_port_pair()
    folder = models_dir(work, "models-tunnel", path)
    node = subprocess.Popen(
        [str(BIN / "mesh-llm"), "serve", "--host", "127.0.0.1", "--no-mdns", "--mesh", "tunnel",
         "--models-dir", str(folder), "--zmq-port", str(node_port), "--http-port", str(free_port_pair(1)),
         "--state-dir", str(work / "tunnel-node"), "--threads", "1"],
        stdout=(work / "tunnel-node.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    ctx = zmq.Context()
    head = TunnelHead(
        ctx, stage=f"tcp://127.0.0.1:{node_port + 3}", identity=layout.identity, first=0, last=half - 1
    )
    try:
        wait(lambda: listening(port), 120, "the direct RPC server")
        time.sleep(2.0)  # the node binds its tunnel port
        head.start()
        if not head.ready.wait(120):
            raise RuntimeError("the stage never became ready")
        assert head.tunnel is not None
        engines = {
            "direct": LlamaEngine(
                str(path), n_ctx=1024, n_threads=1, devices=[f"127.0.0.1:{port}", "cpu"], tensor_split=split
            ),
            "tunnel": LlamaEngine(
                str(path), n_ctx=1024, n_threads=1, devices=[head.tunnel.endpoint, "cpu"], tensor_split=split
            ),
        }
        ms: dict[str, list[float]] = {k: [] for k in engines}
        tunnel = head.tunnel
        base = (
            tunnel.messages_up,
            tunnel.messages_down,
            tunnel.round_trips,
            tunnel.bytes_up,
            tunnel.bytes_down,
        )
        texts: dict[str, str] = {}
        for i in range(rounds):
            for name, engine in engines.items():
                request = Generate(
                    request_id=f"{name}{i}",
                    model="m",
                    prompt=f"{PROMPT} {i}",
                    max_tokens=tokens,
                    temperature=0,
                )
                events = engine.admit(request)
                stamps: list[float] = []
                while engine.active:
                    events += engine.step()
                    stamps.append(time.perf_counter())
                texts[name] = "".join(e.text for e in events if isinstance(e, Chunk))
                ms[name].append(1000 * (stamps[-1] - stamps[0]) / (len(stamps) - 1))
        t = head.tunnel
        n_tokens = rounds * tokens
        up, down, trips = (t.messages_up - base[0], t.messages_down - base[1], t.round_trips - base[2])
        print(f"  tunnel per token: {up / n_tokens:.1f} messages up, {down / n_tokens:.1f} down, "
              f"{trips / n_tokens:.1f} round trips, {(t.bytes_up - base[3]) / n_tokens:.0f} B up, "
              f"{(t.bytes_down - base[4]) / n_tokens:.0f} B down", flush=True)  # fmt: skip
        for (
            engine
        ) in engines.values():  # before the tunnel closes: freeing a model whose stage is gone aborts
            engine.unload()
        med = {k: round(statistics.median(v), 3) for k, v in ms.items()}
        added = round(med["tunnel"] - med["direct"], 3)
        print(
            f"  tunnel {med['tunnel']:.2f} ms/token, direct {med['direct']:.2f}: +{added:.3f} ms", flush=True
        )
        return {"ms_per_token": med, "all_ms_per_token": ms, "added_ms_per_token": added,
                "same_text": texts["direct"] == texts["tunnel"]}  # fmt: skip
    finally:
        head.stop()
        ctx.term()
        stop_process(node)
        direct.kill()
        direct.wait()


# -- (d) faults -----------------------------------------------------------------------------------


def faults(work: Path, path: Path, requests: int, clients: int, max_tokens: int) -> dict[str, Any]:
    lan = Lan()
    nodes: list[Host] = []
    try:
        folder = models_dir(work, "models-faults", path)
        stages = [
            Host(lan, work, "--models-dir", str(folder), "--mesh", "faults", *CTX[-2:]).start()
            for _ in range(2)
        ]
        nodes += stages
        head = Host(
            lan,
            work,
            "--model",
            str(path),
            "--mesh",
            "faults",
            "--split",
            "--ctx",
            "1024",
            "--slots",
            "4",
            "--threads",
            "1",
        )
        nodes.append(head)
        wait(lambda: all(s.ctl("status") for s in stages), 60, "the stage nodes")
        head.start(*[a for s in stages for a in ("--peer", f"{s.address}:{ZMQ}")])
        wait(lambda: serving(head), 300, "the split")
        row = head.split()
        assert row is not None
        victim_id = row["stages"][0]["node_id"]
        victim = next(s for s in stages if (s.ctl("status") or {}).get("node_id") == victim_id)
        outcomes: list[str] = []
        lock = threading.Lock()
        done = threading.Semaphore(0)

        def one(client: httpx.Client, i: int) -> str:
            body = {"model": path.stem, "prompt": f"{PROMPT} {i}", "max_tokens": max_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
            usage, finished, error, got = None, False, None, 0
            try:
                with client.stream("POST", "/v1/completions", json=body, timeout=120) as reply:
                    event = ""
                    for line in reply.iter_lines():
                        if line.startswith("event: error"):
                            event = "error"
                        elif line.startswith("data: {"):
                            data = json.loads(line[6:])
                            if event == "error" or "error" in data:
                                error = data
                            elif data.get("usage"):
                                usage = data["usage"]
                            elif data["choices"]:
                                got += 1
                        elif line == "data: [DONE]":
                            finished = True
            except httpx.TimeoutException:
                return "hung"
            except httpx.HTTPError:
                return "lost"
            if error is not None:
                return "error"
            if not finished or usage is None:
                return "truncated"
            return "complete" if usage["completion_tokens"] == max_tokens else "short"

        def client_loop(k: int) -> None:
            def run() -> None:
                with httpx.Client(base_url=f"http://{head.address}:{HTTP}") as client:
                    for j in range(requests // clients):
                        outcome = one(client, k * 100 + j)
                        with lock:
                            outcomes.append(outcome)
                        done.release()

            run_in(head.ns, run)

        threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for _ in range(requests // 4):
            done.acquire()
        time.sleep(0.3)
        killed_at = time.time()
        victim.kill()
        for t in threads:
            t.join(600)
        served = [t for t in head.log_times(r"split of .* serving") if t > killed_at]
        counts = {k: outcomes.count(k) for k in ("complete", "error", "short", "truncated", "lost", "hung")}
        replan_s = round(served[0] - killed_at, 2) if served else None
        print(f"  faults {counts}, re-planned and serving {replan_s} s after the kill", flush=True)
        resumed = ((head.ctl("status") or {}).get("requests") or {}).get("resumed")
        return {"requests": len(outcomes), "max_tokens": max_tokens, "clients": clients, "outcomes": counts,
                "replan_s": replan_s, "resumed": resumed}  # fmt: skip
    finally:
        for node in nodes:
            node.stop()
        lan.close()


_PART_KEYS = {
    "join": ("join", "join_scaling"),
    "decode": ("decode", "rtt"),
    "tunnel": ("tunnel",),
    "faults": ("faults",),
}


def _kept_parts(parts: set[str]) -> dict[str, Any]:
    """The parts of the last bench/results/split.json that this run does not measure again, each
    with the date and commit it was measured at (under "measured")."""
    path = Path(__file__).resolve().parent / "results" / "split.json"
    try:
        old = json.loads(path.read_text())["results"]
    except (OSError, ValueError, KeyError):
        return {}
    kept: dict[str, Any] = {"measured": {}}
    for part, keys in _PART_KEYS.items():
        if part not in parts and all(k in old for k in keys):
            kept.update({k: old[k] for k in keys})
            kept["measured"][part] = old.get("measured", {}).get(
                part, {"date": "before measured dates were kept"}
            )
    return kept


def _commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--only", choices=("join", "decode", "tunnel", "faults"), action="append")
    args = parser.parse_args()
    why_not = can_make_namespaces()
    if why_not:
        print(f"bench/split.py: {why_not}", file=sys.stderr)
        return 2
    parts = set(args.only or ("join", "decode", "tunnel", "faults"))
    result: dict[str, Any] = _kept_parts(parts)  # with --only, the other parts as last measured
    with tempfile.TemporaryDirectory(prefix="mesh-split-") as tmp:
        work = Path(tmp)
        measured = result.setdefault("measured", {})
        for part in parts:
            measured[part] = {
                "date": datetime.now().astimezone().isoformat(timespec="seconds"),
                "commit": _commit(),
            }
        if "join" in parts:
            print("(a) join, over a 1 Gbit/s link", flush=True)
            result["join"] = [
                join(work, m(), mode)
                for m in (wide_model, narrow_model)
                for mode in ("transfer", "hash-cache", "file")
            ]
            result["join_scaling"] = [join(work, m(), "file") for m in (wide_model, wider_model)]
        if "decode" in parts:
            print("(b) decode", flush=True)
            result["decode"] = decode_rounds(work, decode_model(), args.rounds, args.tokens)
            result["rtt"] = rtt_cost(work, decode_model(), args.tokens)
        if "tunnel" in parts:
            print("(c) tunnel vs direct TCP", flush=True)
            result["tunnel"] = tunnel_vs_direct(work, decode_model(), args.rounds, args.tokens)
        if "faults" in parts:
            print("(d) faults", flush=True)
            result["faults"] = faults(work, small_model(), requests=20, clients=4, max_tokens=200)
    targets: dict[str, bool] = {}
    if "join" in result:
        wide = {r["mode"]: r for r in result["join"] if r["model"] == "split-wide"}
        narrow = {r["mode"]: r for r in result["join"] if r["model"] != "split-wide"}
        speedup = wide["transfer"]["join_s"] / wide["hash-cache"]["join_s"]
        result["wide_join_speedup"] = round(speedup, 2)
        targets[f"wide model: hash-cache joins >= 3x faster than stock ({speedup:.1f}x)"] = speedup >= 3
        frac = wide["hash-cache"]["crossed_fraction"]
        targets[f"wide model: <= 5% of the stage's weights cross ({frac:.1%})"] = frac <= 0.05
        file_speedup = wide["transfer"]["join_s"] / wide["file"]["join_s"]
        result["wide_file_join_speedup"] = round(file_speedup, 2)
        targets[f"wide model: file joins >= 10x faster than stock ({file_speedup:.1f}x)"] = file_speedup >= 10
        for name, rows in (("wide", wide), ("small-tensor", narrow)):
            frac = rows["file"]["crossed_fraction"]
            targets[f"{name} model: file moves <= 1% of the stage's weights ({frac:.2%})"] = frac <= 0.01
            targets[f"{name} model: file writes no copy of the slice on the stage"] = not rows["file"][
                "stage_cache_mb"
            ]
        small, big = result["join_scaling"]
        result["file_join_scaling"] = {
            "weight_ratio": round(big["stage_weight_bytes"] / small["stage_weight_bytes"], 2),
            "join_ratio": round(big["join_s"] / small["join_s"], 2),
        }
    if "tunnel" in result:
        added = result["tunnel"]["added_ms_per_token"]
        targets[f"tunnel adds <= 0.3 ms per token ({added:+.3f} ms)"] = added <= 0.3
        targets["tunnel and direct give the same greedy text"] = result["tunnel"]["same_text"]
    if "faults" in result:
        o = result["faults"]["outcomes"]
        targets["faults: 0 lost, 0 hung, 0 truncated"] = (
            o["lost"] == o["hung"] == o["truncated"] == o["short"] == 0
        )
    path = write_result("split", {"results": result, "targets": targets})
    print_targets(targets, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

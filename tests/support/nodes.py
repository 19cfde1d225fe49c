"""Real node processes for tests and benchmarks: ports, start-up, waits, clean stops."""

from __future__ import annotations

import http.client
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

from actors import PeerUnavailable, ask

BIN = Path(sys.executable).parent


def eventually(
    condition: Callable[[], bool], timeout_s: float = 30.0, show: Callable[[], object] | None = None
) -> float:
    """Seconds until `condition()` held, polling; fails the test after `timeout_s`, saying what
    `show()` last returned."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start >= timeout_s:
            pytest.fail(f"condition not reached in {timeout_s:g}s; last seen: {show() if show else '-'}")
        time.sleep(0.05)
    return time.monotonic() - start


_handed_out: set[int] = set()


def free_port_pair(span: int = 4) -> int:
    """A port p such that p .. p+span-1 are free on 127.0.0.1 now and not handed out before
    (a node uses four: control, router, gossip, split tunnel). Taken below the kernel's ephemeral range, so
    that no outgoing connection's source port can take it between this call and the bind."""
    low = _ephemeral_low()
    for _ in range(500):
        port = random.randrange(10000, low - span)
        ports = set(range(port, port + span))
        if not ports & _handed_out and all(_free(p) for p in ports):
            _handed_out.update(ports)
            return port
    raise RuntimeError("no free ports")


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port now."""
    try:
        socket.create_connection((host, port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@dataclass
class NodeProcess:
    """A real `mesh-llm serve` process on loopback."""

    proc: subprocess.Popen[bytes]
    http_port: int
    zmq_port: int
    log_path: Path
    state: Path | None = None  # its --state-dir: a secured node's credentials are there

    @property
    def secured(self) -> bool:
        return self.state is not None and (self.state / "trust" / "roster.signed").exists()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def control(self) -> str:
        return f"tcp://127.0.0.1:{self.zmq_port}"

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """mesh-ctl against this node (with its credentials, when it is secured)."""
        creds = ["--state-dir", str(self.state)] if self.secured else []
        return subprocess.run(
            [str(BIN / "mesh-ctl"), "--node", self.control, *creds, *args],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def invite(self, *args: str) -> str:
        """A join token from this node (`mesh-ctl invite ARGS`: it holds a secured mesh's authority)."""
        out = self.ctl("invite", *args)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def status(self) -> dict:
        """`mesh-ctl status --json`'s data, asked in-process (mesh-ctl itself is tested apart)."""
        from gateway.ctl._main import credentials

        ctx = zmq.Context()
        keys = credentials(self.state, self.control) if self.state is not None and self.secured else None
        try:
            return ask(ctx, self.control, "status", timeout_s=10, keys=keys)
        finally:
            ctx.term()

    def wait_ready(self, timeout_s: float = 60.0) -> dict:
        """Wait until the worker is ready and idle; returns the status."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"node exited early:\n{self.log()}"
            try:
                status = self.status()
            except PeerUnavailable:
                continue
            if (status["ready"] or status["role"] in ("client", "standby")) and not any(
                w["busy"] for w in status["workers"]
            ):
                return status
            time.sleep(0.02)
        raise AssertionError(f"node not ready in {timeout_s}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    """SIGTERM a process we started, SIGKILL it if it has not exited after `grace_s`; reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_node(tmp: Path, model: Path, *extra: str, state_dir: bool = True) -> NodeProcess:
    """Start `mesh-llm serve` on free loopback ports and wait until it serves."""
    return start_nodes(tmp, model, [list(extra)], state_dir=state_dir)[0]


def start_nodes(
    tmp: Path,
    model: Path | None,
    extras: list[list[str]],
    zmq_ports: list[int] | None = None,
    *,
    state_dir: bool = True,
) -> list[NodeProcess]:
    """Start several nodes at once (their start-ups overlap), then wait until all serve.
    With no model they are client nodes: ready once their HTTP port is open. Without
    `state_dir`, nodes get no `--state-dir` (as a user on one machine would start them); their
    default state dirs land under `tmp` through `XDG_STATE_HOME`."""
    nodes: list[NodeProcess] = []
    try:
        for i, extra in enumerate(extras):
            port = zmq_ports[i] if zmq_ports else None
            nodes.append(launch(tmp, model, *extra, zmq_port=port, state_dir=state_dir))
        for node in nodes:
            node.wait_ready()
            wait_http(node)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


def launch(
    tmp: Path,
    model: Path | None,
    *extra: str,
    zmq_port: int | None = None,
    state_dir: bool = True,
    models_dir: Path | None = None,
    prefix: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> NodeProcess:
    """A `mesh-llm serve` of `model`, or with no model a `mesh-llm client` (a standby holding the
    GGUFs of `models_dir` for dense splits, with one), on free ports; `prefix` runs it through
    another command (a CPU limit, say); `env` adds to its environment."""
    zmq_port = zmq_port or free_port_pair()
    http_port = free_port_pair()
    log_path = tmp / f"node-{zmq_port}.log"
    environ = dict(
        os.environ, XDG_CACHE_HOME=str(tmp / "cache"), XDG_STATE_HOME=str(tmp / "state"), PYTHONUNBUFFERED="1"
    )
    environ.update(env or {})
    what = ["serve", "--model", str(model), "--threads", "1"] if model is not None else ["client"]
    if models_dir is not None:
        what = [
            *(what if model is not None else ["serve", "--threads", "1"]),
            "--models-dir",
            str(models_dir),
        ]
    argv = [
        str(BIN / "mesh-llm"), *what, "--host", "127.0.0.1",
        "--http-port", str(http_port), "--zmq-port", str(zmq_port),
        *(["--state-dir", str(tmp / f"state-{zmq_port}")] if state_dir else []), *extra,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen([*prefix, *argv], stdout=log, stderr=subprocess.STDOUT, env=environ)
    state = tmp / f"state-{zmq_port}" if state_dir else None
    return NodeProcess(proc=proc, http_port=http_port, zmq_port=zmq_port, log_path=log_path, state=state)


def wait_http(node: NodeProcess, timeout_s: float = 30.0) -> None:
    """Until an HTTP request gets an answer: gunicorn binds before its worker exists."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=2)
        try:
            conn.request("GET", "/health")
            conn.getresponse().read()
            return
        except OSError:
            time.sleep(0.05)
        finally:
            conn.close()
    raise AssertionError(f"HTTP port never opened:\n{node.log()}")

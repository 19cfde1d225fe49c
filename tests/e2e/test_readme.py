"""The README's several-nodes-on-one-machine example, run exactly as written."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.nodes import BIN, eventually, stop_process

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[2]


def readme_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- one-machine[^>]*-->\n```sh\n(.*?)```\n<!-- /one-machine -->", text, re.S)
    assert block, "the README lost its one-machine example"
    return [line for line in block.group(1).splitlines() if line.strip()]


def _ports(lines: list[str]) -> list[int]:
    ports = []
    for line in lines:
        argv = shlex.split(line)
        zmq = int(argv[argv.index("--zmq-port") + 1]) if "--zmq-port" in argv else 9338
        http = int(argv[argv.index("--http-port") + 1]) if "--http-port" in argv else 9337
        ports += [http, zmq, zmq + 1, zmq + 2]
    return ports


def _busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def example(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    lines = readme_lines()
    busy = [p for p in _ports(lines) if _busy(p)]
    if busy:
        pytest.skip(f"the README's example uses ports {busy} that something on this machine holds")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), XDG_STATE_HOME=str(tmp_path / "state"))
    procs = []
    try:
        for i, line in enumerate(lines):
            argv = shlex.split(line)
            argv[0] = str(BIN / Path(argv[0]).name)  # `.venv/bin/...` of this checkout
            with (tmp_path / f"node{i}.log").open("wb") as log:
                procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env))
        yield procs
    finally:
        for proc in procs:
            stop_process(proc)


def test_the_readme_s_one_machine_example_makes_a_mesh(example: list[subprocess.Popen[bytes]]) -> None:
    def health() -> int:
        try:
            return httpx.get("http://127.0.0.1:9367/health", timeout=5).status_code
        except httpx.HTTPError:
            return 0

    eventually(lambda: health() == 200, 90)
    ctl = [str(BIN / "mesh-ctl"), "--node", "tcp://127.0.0.1:9420", "peers", "--json"]

    def serving_peers() -> int:
        out = subprocess.run(ctl, capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            return -1
        return sum(p["state"] == "alive" and p["role"] == "serving" for p in json.loads(out.stdout))

    eventually(lambda: serving_peers() == 3, 60)
    body = {"model": "mesh-llm-demo-random", "prompt": "hi", "max_tokens": 3}
    r = httpx.post("http://127.0.0.1:9367/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["X-Mesh-Node"]
    assert all(proc.poll() is None for proc in example)

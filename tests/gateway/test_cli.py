"""`mesh-llm serve` refuses bad setups clearly, and the gateway fails fast when its node is gone."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from pathlib import Path

import pytest

from actors import Generate, PeerUnavailable
from gateway import RouterClient, create_app
from tests.support.asgi import AsgiClient
from tests.support.nodes import BIN, free_port_pair


def serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [str(BIN / "mesh-llm"), "serve", "--state-dir", str(tmp_path / "state"), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_a_missing_model_file_is_refused_with_its_path(tmp_path: Path) -> None:
    out = serve(tmp_path, "--model", str(tmp_path / "nope.gguf"))
    assert out.returncode == 2 and "nope.gguf does not exist" in out.stderr


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"PK\x03\x04 not a model")
    out = serve(tmp_path, "--model", str(bogus))
    assert out.returncode == 2 and "not a GGUF file" in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flag", "message"),
    [("--zmq-port", "cannot start the node"), ("--http-port", "cannot listen on 127.0.0.1")],
)
def test_a_port_in_use_is_a_clear_start_error(
    tmp_path: Path, tiny_model: Path, flag: str, message: str
) -> None:
    ports = {"--zmq-port": free_port_pair(), "--http-port": free_port_pair()}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[flag]))
        taken.listen()
        out = serve(tmp_path, "--model", str(tiny_model), *(str(x) for kv in ports.items() for x in kv))
    assert out.returncode == 1 and message in out.stderr


def test_the_gateway_answers_503_quickly_when_its_router_is_gone() -> None:
    backend = RouterClient(f"tcp://127.0.0.1:{free_port_pair()}", idle_timeout_s=0.3)

    async def first_event() -> None:
        async for _ in backend.stream(Generate(request_id="r", model="m", prompt="x")):
            pass

    with pytest.raises(PeerUnavailable):
        asyncio.run(first_event())
    client = AsgiClient(create_app(backend, node_id="n"))
    health = client.simulate_get("/health")
    assert health.status_code == 503 and health.json["status"] == "unavailable"
    result = client.simulate_post("/v1/completions", json={"model": "m", "prompt": "x"})
    assert result.status_code == 503 and result.json["error"]["code"] == "peer_unavailable"
    asyncio.run(backend.close())


def test_an_http_port_among_the_zmq_ports_is_refused_clearly(tmp_path: Path) -> None:
    argv = [str(BIN / "mesh-llm"), "client", "--zmq-port", "9400", "--http-port", "9401", "--no-mdns"]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env={"XDG_STATE_HOME": str(tmp_path)}
    )
    assert done.returncode == 2 and "is one of this node's ZeroMQ ports (9400-9403" in done.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--cors-origin", "app.example"], "expected an origin"),
        (["--cors-origin", "https://app.example/path"], "expected an origin"),
        (["--max-memory", "0"], "--max-memory must be a positive number"),
        (["--models-dir", "/nonexistent/dir"], "is not a directory"),
        (["--models-dir", ".", "--split"], "--draft, --split and --alias need --model"),
        (["--models-dir", ".", "--alias", "x"], "--draft, --split and --alias need --model"),
        (["--models-dir", ".", "--standby", "--alias", "x"], "--draft, --split and --alias need --model"),
        (["--alias", "two words"], "without spaces"),
        (["--standby", "--split"], "do not go together"),
        (["--promote-after", "-1"], "at least 0"),
        (["--stream-interval", "-5"], "not between 0 and 1000"),
        (["--stream-interval", "soon"], "not a number of milliseconds"),
    ],
)
def test_bad_node_options_are_refused_clearly(tmp_path: Path, args: list[str], words: str) -> None:
    argv = [str(BIN / "mesh-llm"), "serve", "--no-mdns", "--zmq-port", "9450", "--http-port", "9449", *args]
    env = {"XDG_STATE_HOME": str(tmp_path)}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert done.returncode == 2 and words in done.stderr, done.stderr

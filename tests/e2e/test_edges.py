"""What a careless or hostile client meets at a real node's HTTP edge (wave 1's symptoms 2, 8, 9,
10 and 12): each test failed on wave 1's code."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import pytest

from actors.gguf import shape_for, synthesize
from tests.support.nodes import NodeProcess, start_node

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
MODEL = "qwenish"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A node serving a model whose tokenizer adds no BOS token, as the Qwen2 family's does."""
    path = synthesize(
        "llama", tmp_path_factory.mktemp("m") / f"{MODEL}.gguf", shape_for("llama", "small"), add_bos=False
    )
    proc = start_node(tmp_path_factory.mktemp("node"), path, "--slots", "4")
    yield proc
    proc.stop()


def complete(node: NodeProcess, timeout: float = 30, **body: object) -> httpx.Response:
    return httpx.post(
        f"{node.url}/v1/completions", json={"model": MODEL, "max_tokens": 4, **body}, timeout=timeout
    )


def test_empty_prompts_on_a_model_without_bos_are_refused_and_hold_no_slot(node: NodeProcess) -> None:
    """Wave 1: four of these hung every later request while /health said ok."""
    for _ in range(6):
        r = complete(node, prompt="")
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert complete(node, prompt="hello").status_code == 200
    assert node.wait_ready(timeout_s=5)["in_flight"] == 0


def test_a_hundred_slow_clients_do_not_lock_out_a_normal_one(node: NodeProcess) -> None:
    """Wave 1: 32 connections trickling their headers held every gunicorn thread."""
    with ExitStack() as stack:
        for i in range(100):
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", node.http_port)))
            # Half trickle their headers, half announce a body and never send it.
            if i % 2:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            else:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        time.sleep(0.5)
        started = time.monotonic()
        health = httpx.get(f"{node.url}/health", timeout=5)
        health_s = time.monotonic() - started
        r = complete(node, prompt="hello", timeout=10)
        assert health.status_code == 200 and r.status_code == 200
        print(f"/health in {health_s * 1000:.0f} ms, a completion in {time.monotonic() - started:.2f} s")
        assert health_s < 1.0


def test_a_plain_request_is_cancelled_when_its_client_leaves(node: NodeProcess) -> None:
    """Wave 1: 20 abandoned non-streaming requests kept a node busy ~80 s."""
    before = node.status()["requests"]
    sockets = []
    for _ in range(6):
        sock = socket.create_connection(("127.0.0.1", node.http_port))
        body = b'{"model": "%s", "prompt": "x", "max_tokens": 4000, "temperature": 0}' % MODEL.encode()
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        sockets.append(sock)
    time.sleep(1.0)
    for sock in sockets:
        sock.close()
    left = time.monotonic()
    status = node.wait_ready(timeout_s=10)
    print(f"workers idle {time.monotonic() - left:.2f} s after 6 clients left")
    assert status["requests"]["cancelled"] - before["cancelled"] == 6
    assert status["in_flight"] == 0


def test_a_body_just_under_the_limit_is_answered_at_once_and_chunked_bodies_are_read(
    node: NodeProcess,
) -> None:
    """Wave 1: a body just under 4 MiB passed the gateway and got 503 after 15 s; chunked bodies
    were always 400."""
    prompt = "x" * (4 * 1024 * 1024 - 200)
    started = time.monotonic()
    r = complete(node, prompt=prompt)
    elapsed = time.monotonic() - started
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    print(f"a 4 MiB prompt refused in {elapsed:.2f} s")
    assert elapsed < 5
    over = complete(node, prompt="x" * (4 * 1024 * 1024 + 10))
    assert over.status_code == 413

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "%s", ' % MODEL.encode()
        yield b'"prompt": "hello", "max_tokens": 3}'

    chunked = httpx.post(f"{node.url}/v1/completions", content=chunks(), timeout=30)
    assert chunked.status_code == 200, chunked.text
    huge = httpx.post(f"{node.url}/v1/completions", content=(b"x" * 65536 for _ in range(100)), timeout=30)
    assert huge.status_code == 413


def test_the_request_counters_add_up(node: NodeProcess) -> None:
    """Wave 1: cancelled requests also counted as completed, and `admitted` included 429s."""
    node.wait_ready(timeout_s=10)
    before = node.status()["requests"]
    assert complete(node, prompt="a").status_code == 200
    assert complete(node, prompt="").status_code == 400
    body = {"model": MODEL, "prompt": "x", "max_tokens": 4000, "stream": True}
    with httpx.stream("POST", f"{node.url}/v1/completions", json=body, timeout=30) as r:
        next(r.iter_lines())
    node.wait_ready(timeout_s=10)
    after = node.status()["requests"]
    delta = {k: after[k] - before[k] for k in ("admitted", "completed", "failed", "cancelled")}
    assert delta == {"admitted": 3, "completed": 1, "failed": 1, "cancelled": 1}
    assert after["admitted"] == after["completed"] + after["failed"] + after["cancelled"] + after["in_flight"]

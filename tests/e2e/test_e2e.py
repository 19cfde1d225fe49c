"""End to end: a real `mesh-llm serve` process (gunicorn, actors, llama.cpp child) on loopback."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from actors.gguf import shape_for, synthesize
from tests.support.nodes import NodeProcess, start_node

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
MODEL = "e2e-small"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say something."}]}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 9M parameters: slow enough (hundreds of tokens/s) to stop mid-stream."""
    path = tmp_path_factory.mktemp("e2e") / f"{MODEL}.gguf"
    return synthesize("llama", path, shape_for("llama", "small"), seed=2)


@pytest.fixture(scope="module")
def node(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = start_node(tmp_path_factory.mktemp("node"), model, "--max-body-bytes", "100000")
    yield proc
    proc.stop()
    assert proc.proc.returncode == 0, proc.log()


@pytest.fixture(scope="module")
def guarded(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A node with an API key, one slot and a queue of one."""
    args = ("--api-key", "k3y", "--queue-depth", "1", "--ctx", "32768", "--slots", "1")
    proc = start_node(tmp_path_factory.mktemp("guarded"), model, *args)
    yield proc
    proc.stop()


@pytest.fixture
def oai(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0, timeout=60)


def post(node: NodeProcess, path: str, body: object, **kw: object) -> httpx.Response:
    return httpx.post(f"{node.url}{path}", json=body, timeout=60, **kw)  # type: ignore[arg-type]


def test_the_openai_client_gets_a_chat_completion_with_usage(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(model=MODEL, messages=CHAT["messages"], max_tokens=12, temperature=0)  # type: ignore[arg-type]
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_the_openai_client_streams_a_chat_with_usage_last(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=CHAT["messages"],
        max_tokens=10,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    whole = oai.chat.completions.create(model=MODEL, messages=CHAT["messages"], max_tokens=10, temperature=0)  # type: ignore[arg-type]
    assert text == whole.choices[0].message.content, "greedy streamed and whole answers must agree"


def test_the_openai_client_gets_completions_stream_and_not(oai: openai.OpenAI) -> None:
    whole = oai.completions.create(model=MODEL, prompt="The mesh", max_tokens=8, temperature=0)
    assert whole.usage is not None and whole.usage.completion_tokens == 8
    pieces = list(
        oai.completions.create(model=MODEL, prompt="The mesh", max_tokens=8, temperature=0, stream=True)
    )
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text


def test_the_same_seed_gives_the_same_sample(oai: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        r = oai.completions.create(model=MODEL, prompt="Once", max_tokens=16, temperature=1.0, seed=seed)
        return r.choices[0].text

    assert sample(7) == sample(7)


def test_a_stop_string_ends_the_completion_without_including_it(oai: openai.OpenAI) -> None:
    text = oai.completions.create(model=MODEL, prompt="x", max_tokens=40, temperature=0).choices[0].text
    stop = text[5:8]
    assert stop.strip(), "the model's greedy text should have something to stop on"
    cut = oai.completions.create(model=MODEL, prompt="x", max_tokens=40, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_models_and_health_answer_with_the_node_header(node: NodeProcess) -> None:
    models = httpx.get(f"{node.url}/v1/models")
    assert [m["id"] for m in models.json()["data"]] == [MODEL]
    health = httpx.get(f"{node.url}/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    node_id = node.status()["node_id"]
    assert models.headers["X-Mesh-Node"] == health.headers["X-Mesh-Node"] == node_id


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"),
    [
        ("/v1/chat/completions", b"{not json", 400, None, None),
        ("/v1/chat/completions", {**CHAT, "temperature": 9}, 400, "temperature", None),
        ("/v1/completions", {"model": MODEL}, 400, "prompt", None),
        ("/v1/chat/completions", {**CHAT, "model": "no-such-model"}, 404, "model", "model_not_found"),
        ("/v1/completions", {"model": MODEL, "prompt": "word " * 5000}, 400, None, "context_length_exceeded"),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "x", "max_tokens": 5000},
            400,
            None,
            "context_length_exceeded",
        ),
        ("/v1/completions", {"model": MODEL, "prompt": "x" * 200_000}, 413, None, "request_too_large"),
        ("/v1/nowhere", {}, 404, None, None),
    ],
)
def test_every_error_case_is_an_openai_error_with_its_status(
    node: NodeProcess, path: str, body: object, status: int, param: str | None, code: str | None
) -> None:
    if isinstance(body, bytes):
        r = httpx.post(f"{node.url}{path}", content=body, headers={"Content-Type": "application/json"})
    else:
        r = post(node, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    if code == "context_length_exceeded":
        assert error["n_ctx"] == 4096 and error["prompt_tokens"] > 0
    assert r.headers["X-Mesh-Node"]


def test_a_client_that_disconnects_mid_stream_frees_the_worker(node: NodeProcess) -> None:
    before = node.status()["requests"]["cancelled"]
    body = {"model": MODEL, "prompt": "x", "max_tokens": 3000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{node.url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: "):
            pass
        next(lines)
    gone = time.monotonic()  # the connection is closed here, mid-stream
    status = node.wait_ready(timeout_s=10)
    freed_s = time.monotonic() - gone
    assert status["requests"]["cancelled"] == before + 1
    assert freed_s < 5, f"the worker stayed busy {freed_s:.1f}s after the client left"
    assert post(node, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 3}).status_code == 200


def test_killing_the_engine_mid_stream_resumes_the_stream_on_the_restarted_engine(
    node: NodeProcess, oai: openai.OpenAI
) -> None:
    """The engine child dies mid-stream: the worker restarts it and the router resumes the stream
    from the token ids already sent; the greedy text is the uninterrupted one."""
    prompt = "the engine dies mid-stream"  # evaluated whole, as its resume is
    whole = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=400, temperature=0).choices[0].text
    status = node.status()
    pid, restarts = status["workers"][0]["engine_pid"], status["workers"][0]["restarts"]
    resumed = status["requests"]["resumed"]
    stream = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=400, temperature=0, stream=True)
    received = []
    for chunk in stream:
        received.append(chunk.choices[0].text)
        if len(received) == 1:  # the first token comes alone, the next ones a stream interval later
            os.kill(pid, signal.SIGKILL)
    assert "".join(received) == whole
    status = node.wait_ready(timeout_s=60)
    assert status["workers"][0]["restarts"] == restarts + 1 and status["workers"][0]["engine_pid"] != pid
    assert status["requests"]["resumed"] == resumed + 1


def test_killing_the_engine_during_a_plain_request_still_answers_it_whole(node: NodeProcess) -> None:
    pid = node.status()["workers"][0]["engine_pid"]
    result: dict[str, httpx.Response] = {}
    body = {"model": MODEL, "prompt": "x", "max_tokens": 300, "temperature": 0}
    worker = threading.Thread(target=lambda: result.setdefault("r", post(node, "/v1/completions", body)))
    worker.start()
    deadline = time.monotonic() + 20
    while not node.status()["workers"][0]["busy"] and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    worker.join(60)
    r = result["r"]
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 300
    node.wait_ready(timeout_s=60)


def test_mesh_ctl_status_json_matches_the_interface_contract(node: NodeProcess) -> None:
    status = node.status()
    assert {"node_id", "mesh", "role", "models", "peers"} <= status.keys()
    assert status["models"] == [MODEL] and status["role"] == "serving" and status["mesh"] == "default"
    assert isinstance(status["peers"], list)
    models = json.loads(node.ctl("models", "--json").stdout)
    assert models == [{"id": MODEL, "nodes": [status["node_id"]], "ready_nodes": [status["node_id"]]}]
    assert json.loads(node.ctl("peers", "--json").stdout) == []
    table = node.ctl("status")
    assert table.returncode == 0 and status["node_id"] in table.stdout and MODEL in table.stdout


def test_mesh_ctl_reports_an_unreachable_node_clearly(node: NodeProcess) -> None:
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    out = subprocess.run(
        [str(bin_dir / "mesh-ctl"), "--node", "tcp://127.0.0.1:9", "--timeout", "0.5", "status"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 1 and "no answer" in out.stderr


def test_an_api_key_is_required_except_for_health(guarded: NodeProcess) -> None:
    assert httpx.get(f"{guarded.url}/health").status_code == 200
    r = post(guarded, "/v1/completions", {"model": MODEL, "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    ok = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="k3y", max_retries=0)
    assert ok.completions.create(model=MODEL, prompt="x", max_tokens=2).usage is not None


def test_a_full_queue_answers_429_with_retry_after(guarded: NodeProcess) -> None:
    auth = {"Authorization": "Bearer k3y"}
    long = {"model": MODEL, "prompt": "x", "max_tokens": 30000, "temperature": 0, "stream": True}
    queued: dict[str, httpx.Response] = {}
    with httpx.stream(
        "POST", f"{guarded.url}/v1/completions", json=long, headers=auth, timeout=60
    ) as running:
        lines = running.iter_lines()  # kept referenced: a collected iterator closes the stream
        next(lines)  # the first request holds the worker
        waiter = threading.Thread(
            target=lambda: queued.setdefault(
                "r",
                post(guarded, "/v1/completions", {**long, "stream": False, "max_tokens": 5}, headers=auth),
            )
        )
        waiter.start()
        deadline = time.monotonic() + 10
        while guarded.status()["queues"].get(MODEL, 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        rejected = post(
            guarded, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1}, headers=auth
        )
    waiter.join(120)
    assert rejected.status_code == 429
    assert rejected.json()["error"]["type"] == "rate_limit_error"
    assert int(rejected.headers["Retry-After"]) > 0
    assert queued["r"].status_code == 200, "the queued request is served once the worker is free"


def test_concurrent_requests_are_decoded_together_in_one_engine(node: NodeProcess) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 3000, "temperature": 0, "stream": True}
    with (
        httpx.stream("POST", f"{node.url}/v1/completions", json=body, timeout=60) as first,
        httpx.stream("POST", f"{node.url}/v1/completions", json=body, timeout=60) as second,
    ):
        lines = first.iter_lines(), second.iter_lines()  # headers came: both have started
        assert next(lines[0]).startswith("data: ") and next(lines[1]).startswith("data: ")
        worker = node.status()["workers"][0]
        assert worker["slots"] == 4 and worker["active"] == 2
    node.wait_ready(timeout_s=10)  # both cancelled by the disconnects


def test_the_node_still_serves_after_every_failure_above(node: NodeProcess, oai: openai.OpenAI) -> None:
    assert httpx.get(f"{node.url}/health").status_code == 200
    assert oai.completions.create(model=MODEL, prompt="x", max_tokens=3).usage is not None


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        return ") Z" not in Path(f"/proc/{pid}/stat").read_text()  # a zombie has already died
    except OSError:
        return False


def test_a_node_killed_with_sigkill_leaves_no_process_behind(model: Path, tmp_path: Path) -> None:
    doomed = start_node(tmp_path, model)
    children = descendants(doomed.proc.pid)
    try:
        assert len(children) >= 3, "gunicorn master, its worker, and the engine child"
        doomed.proc.kill()
        doomed.proc.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(alive(pid) for pid in children):
            time.sleep(0.05)
        assert not [pid for pid in children if alive(pid)], "processes outlived their node"
    finally:
        for pid in children:  # ours, started by the node: clean up even when the test fails
            if alive(pid) and str(tmp_path).encode() in Path(f"/proc/{pid}/environ").read_bytes():
                os.kill(pid, signal.SIGKILL)
        doomed.stop()


def test_the_openai_client_sampling_controls_take_effect_and_n_gives_several_choices(
    oai: openai.OpenAI,
) -> None:
    """Through the official client: penalties and logit_bias change greedy output; parameters the
    node does not implement are a 400 naming them, never silently ignored; `n` asks for as many
    choices (seeded: reproducible, and different from each other)."""
    ask = {"model": MODEL, "messages": CHAT["messages"], "max_tokens": 24, "temperature": 0}
    plain = oai.chat.completions.create(**ask).choices[0].message.content  # type: ignore[call-overload]
    penalised = oai.chat.completions.create(**ask, frequency_penalty=2.0).choices[0].message.content  # type: ignore[call-overload]
    assert penalised != plain
    forced = oai.chat.completions.create(**ask, logit_bias={"300": 100}).choices[0]  # type: ignore[call-overload]
    assert forced.message.content and forced.finish_reason == "length"
    assert len(set(forced.message.content.split())) <= 1  # one token, over and over
    with pytest.raises(openai.BadRequestError, match="'functions' is not supported"):
        oai.chat.completions.create(**ask, functions=[{"name": "f"}])  # type: ignore[call-overload]
    sampled = {**ask, "temperature": 1.0, "seed": 7, "max_tokens": 12}
    three = oai.chat.completions.create(**sampled, n=3)  # type: ignore[call-overload]
    texts = [c.message.content for c in sorted(three.choices, key=lambda c: c.index)]
    assert [c.index for c in three.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert three.usage.completion_tokens == 36  # type: ignore[union-attr]
    again = oai.chat.completions.create(**sampled, n=3)  # type: ignore[call-overload]
    assert [c.message.content for c in sorted(again.choices, key=lambda c: c.index)] == texts
    streamed: dict[int, str] = {}
    for chunk in oai.chat.completions.create(**sampled, n=3, stream=True):  # type: ignore[call-overload]
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert [streamed[i] for i in range(3)] == texts


def test_structured_output_through_the_openai_clients_parse(oai: openai.OpenAI) -> None:
    """`response_format` with a strict JSON schema: the official client's `parse()` gets an object
    that validates, from a model with random weights (the grammar, not the weights, does it)."""
    from pydantic import BaseModel

    class Verdict(BaseModel):
        ok: bool
        score: int

    reply = oai.beta.chat.completions.parse(
        model=MODEL,
        messages=CHAT["messages"],
        max_tokens=64,
        temperature=0,
        response_format=Verdict,  # type: ignore[arg-type]
    )
    verdict = reply.choices[0].message.parsed
    assert isinstance(verdict, Verdict)
    json_mode = oai.chat.completions.create(
        model=MODEL,
        messages=CHAT["messages"],
        max_tokens=8,
        temperature=0,
        response_format={"type": "json_object"},  # type: ignore[arg-type]
    )
    assert (json_mode.choices[0].message.content or "").lstrip().startswith("{")

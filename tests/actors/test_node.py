"""A node's router and shard-worker, in process, with fake engines in real child processes."""

from __future__ import annotations

import time
import uuid

import zmq

from actors import (
    TERMINAL_TYPES,
    Accepted,
    Cancel,
    Chunk,
    ErrorReply,
    Finished,
    Generate,
    ModelSpec,
    Node,
    NodeConfig,
    NodeSpec,
    Started,
    ask,
    decode,
    encode,
    make_socket,
)
from actors.wire import MeshView
from actors.wire._messages import Load, PeerRow
from tests.support.nodes import eventually, free_port_pair

FAST = NodeConfig(
    queue_depth_per_model=2, engine_restart_backoff_s=0.05, cancel_grace_s=0.5, keepalive_interval_s=0.2
)


def make_node(spec: str, **config: object) -> Node:
    cfg = NodeConfig(**{**{f: getattr(FAST, f) for f in FAST.__slots__}, **config})  # type: ignore[arg-type]
    node_spec = NodeSpec(
        node_id="test-node",
        zmq_port=free_port_pair(),
        models=[ModelSpec(source=spec, model_id="fake")],
        config=cfg,
    )
    return Node(node_spec)


class Client:
    """A gateway stand-in: one DEALER to the router."""

    def __init__(self, zmq_ctx: zmq.Context, node: Node) -> None:
        self.sock = make_socket(zmq_ctx, zmq.DEALER)
        self.sock.connect(node.spec.router_endpoint)

    def send(self, **fields: object) -> str:
        rid = uuid.uuid4().hex
        self.sock.send(encode(Generate(request_id=rid, model="fake", **fields)))  # type: ignore[arg-type]
        return rid

    def next(self, timeout_s: float = 10.0) -> object:
        assert self.sock.poll(int(timeout_s * 1000)), "no message in time"
        return decode(self.sock.recv())

    def until_terminal(self, rid: str, timeout_s: float = 10.0) -> list[object]:
        return self.until_all_terminal([rid], timeout_s)[rid]

    def until_all_terminal(self, rids: list[str], timeout_s: float = 10.0) -> dict[str, list[object]]:
        out: dict[str, list[object]] = {rid: [] for rid in rids}
        open_rids = set(rids)
        while open_rids:
            message = self.next(timeout_s)
            rid = getattr(message, "request_id", None)
            if rid in open_rids:
                out[rid].append(message)
                if isinstance(message, TERMINAL_TYPES):
                    open_rids.discard(rid)
        return out

    def close(self) -> None:
        self.sock.close()


def wait_ready(zmq_ctx: zmq.Context, node: Node, timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = ask(zmq_ctx, node.spec.control_endpoint, "status", timeout_s=2)
        if status["ready"] and not any(w["busy"] for w in status["workers"]):
            return status
        time.sleep(0.02)
    raise AssertionError(f"not ready: {status}")


def test_a_request_streams_accepted_started_chunks_and_finished(zmq_ctx: zmq.Context) -> None:
    with make_node("fake:delay_ms=1") as node:
        wait_ready(zmq_ctx, node)
        client = Client(zmq_ctx, node)
        events = client.until_terminal(client.send(prompt="a b c", max_tokens=3))
        assert [type(e) for e in events] == [Accepted, Started, Chunk, Chunk, Chunk, Finished]
        assert "".join(e.text for e in events if isinstance(e, Chunk)) == " w0 w1 w2"
        assert events[-1].completion_tokens == 3 and events[-1].prompt_tokens == 3
        client.close()


def test_a_full_queue_answers_overloaded_with_retry_after(zmq_ctx: zmq.Context) -> None:
    with make_node("fake:delay_ms=20") as node:
        wait_ready(zmq_ctx, node)
        client = Client(zmq_ctx, node)
        rids = [client.send(prompt="x", max_tokens=20) for _ in range(4)]  # 1 running + 2 queued + 1
        results = {rid: events[-1] for rid, events in client.until_all_terminal(rids).items()}
        overloaded = [r for r in results.values() if isinstance(r, ErrorReply)]
        assert len(overloaded) == 1 and overloaded[0].code == "overloaded"
        assert overloaded[0].details["retry_after"] == FAST.retry_after_s
        assert sum(isinstance(r, Finished) for r in results.values()) == 3
        client.close()


def test_an_unknown_model_is_refused_with_model_not_found(zmq_ctx: zmq.Context) -> None:
    with make_node("fake:") as node:
        wait_ready(zmq_ctx, node)
        client = Client(zmq_ctx, node)
        rid = uuid.uuid4().hex
        client.sock.send(encode(Generate(request_id=rid, model="nope", prompt="x")))
        (reply,) = client.until_terminal(rid)
        assert isinstance(reply, ErrorReply) and reply.code == "model_not_found"
        client.close()


def test_a_prompt_longer_than_the_context_fails_with_the_token_counts(zmq_ctx: zmq.Context) -> None:
    with make_node("fake:n_ctx=8") as node:
        wait_ready(zmq_ctx, node)
        client = Client(zmq_ctx, node)
        events = client.until_terminal(client.send(prompt="one two three four five six", max_tokens=5))
        error = events[-1]
        assert isinstance(error, ErrorReply) and error.code == "context_length_exceeded"
        assert error.details == {"n_ctx": 8, "prompt_tokens": 6, "max_tokens": 5}
        client.close()


def test_cancel_stops_generation_and_frees_the_worker_for_the_next_request(zmq_ctx: zmq.Context) -> None:
    with make_node("fake:delay_ms=5,n_ctx=1000000") as node:
        wait_ready(zmq_ctx, node)
        client = Client(zmq_ctx, node)
        rid = client.send(prompt="x", max_tokens=100000)
        while not isinstance(client.next(), Chunk):
            pass
        cancelled_at = time.monotonic()
        client.sock.send(encode(Cancel(request_id=rid)))
        wait_ready(zmq_ctx, node)
        assert time.monotonic() - cancelled_at < 1.0
        events = client.until_terminal(client.send(prompt="x", max_tokens=2))
        assert isinstance(events[-1], Finished)
        status = ask(zmq_ctx, node.spec.control_endpoint, "status", timeout_s=2)
        assert status["requests"]["cancelled"] == 1 and status["workers"][0]["restarts"] == 0
        client.close()


def test_an_engine_that_ignores_cancel_is_killed_and_restarted(zmq_ctx: zmq.Context) -> None:
    with make_node("fake:hang_after=0") as node:  # hangs as in a long prompt evaluation
        wait_ready(zmq_ctx, node)
        client = Client(zmq_ctx, node)
        rid = client.send(prompt="x", max_tokens=10)
        assert isinstance(client.next(), Accepted)
        client.sock.send(encode(Cancel(request_id=rid)))
        status = wait_ready(zmq_ctx, node)
        assert status["workers"][0]["restarts"] == 1, str(status)
        client.close()


def test_an_engine_crash_fails_the_request_cleanly_and_the_next_one_succeeds(zmq_ctx: zmq.Context) -> None:
    with make_node("fake:crash_after=3", max_resumes=0) as node:
        wait_ready(zmq_ctx, node)
        client = Client(zmq_ctx, node)
        events = client.until_terminal(client.send(prompt="x", max_tokens=10))
        assert isinstance(events[-1], ErrorReply) and events[-1].code == "engine_failed"
        assert "engine process died" in events[-1].message
        wait_ready(zmq_ctx, node)
        events = client.until_terminal(client.send(prompt="x", max_tokens=2))
        assert isinstance(events[-1], Finished)
        client.close()


def test_a_request_resumes_after_its_engine_crashed_until_it_has_crashed_too_often(
    zmq_ctx: zmq.Context,
) -> None:
    """The engine dies as it is about to generate the 3rd token of each request it runs: a
    request resumes on the restarted engine from the tokens it has (`max_resumes` times), then
    fails. (A dying engine may take its last tokens with it, unsent: resuming from fewer tokens
    costs a resume more, which the limit leaves room for.)"""
    with make_node("fake:crash_after=3", max_resumes=6) as node:
        wait_ready(zmq_ctx, node)
        client = Client(zmq_ctx, node)
        try:
            events = client.until_terminal(client.send(prompt="x", max_tokens=8))
            text = "".join(e.text for e in events if isinstance(e, Chunk))
            assert isinstance(events[-1], Finished), events[-1]
            assert text == "".join(f" w{k}" for k in range(8)) and events[-1].completion_tokens == 8
            assert sum(isinstance(e, Started) for e in events) == 1  # one seamless stream
            events = client.until_terminal(client.send(prompt="x", max_tokens=100))  # > 7 runs of 2
            assert isinstance(events[-1], ErrorReply) and events[-1].code == "engine_failed"
            status = ask(zmq_ctx, node.spec.control_endpoint, "status", timeout_s=2)
            assert status["requests"]["resumed"] >= 3 + 6
        finally:
            client.close()


def test_a_model_that_never_loads_marks_the_worker_failed_and_requests_fail_fast(
    zmq_ctx: zmq.Context,
) -> None:
    with make_node("fake:fail_load=1", engine_max_failed_loads=2) as node:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = ask(zmq_ctx, node.spec.control_endpoint, "status", timeout_s=2)
            if status["workers"] and status["workers"][0]["state"] == "failed":
                break
            time.sleep(0.05)
        assert status["workers"][0]["state"] == "failed"
        assert "fail loading" in status["workers"][0]["detail"]
        client = Client(zmq_ctx, node)
        (reply,) = client.until_terminal(client.send(prompt="x"))
        assert isinstance(reply, ErrorReply) and reply.code == "engine_failed"
        client.close()


def test_stopping_the_node_fails_requests_in_flight_instead_of_dropping_them(zmq_ctx: zmq.Context) -> None:
    node = make_node("fake:delay_ms=50,n_ctx=100000").start()
    try:
        wait_ready(zmq_ctx, node)
        client = Client(zmq_ctx, node)
        rid = client.send(prompt="x", max_tokens=1000)
        assert isinstance(client.next(), Accepted)
    finally:
        node.stop()
    events = client.until_terminal(rid)
    assert isinstance(events[-1], ErrorReply) and "shutting down" in events[-1].message
    client.close()


def test_the_router_keeps_a_waiting_client_informed_with_pending(zmq_ctx: zmq.Context) -> None:
    with make_node("fake:delay_ms=400") as node:
        wait_ready(zmq_ctx, node)
        client = Client(zmq_ctx, node)
        client.send(prompt="x", max_tokens=2)
        kinds = {type(client.next()).__name__ for _ in range(4)}
        assert "Pending" in kinds
        client.close()


def test_a_worker_with_two_slots_runs_two_requests_at_once_and_queues_the_third(zmq_ctx: zmq.Context) -> None:
    with make_node("fake:delay_ms=10,slots=2,n_ctx=100000") as node:
        wait_ready(zmq_ctx, node)
        client = Client(zmq_ctx, node)
        a, b, c = (client.send(prompt="x", max_tokens=20) for _ in range(3))
        log: list[tuple[str, str]] = []  # (request, kind) in arrival order
        while sum(kind in ("Finished", "ErrorReply") for _, kind in log) < 3:
            message = client.next()
            log.append((message.request_id, type(message).__name__))  # type: ignore[attr-defined]
        first_finish = min(log.index((r, "Finished")) for r in (a, b))
        assert log.index((a, "Chunk")) < first_finish and log.index((b, "Chunk")) < first_finish
        assert log.index((c, "Started")) > first_finish, "the third waits for a free slot"
        status = ask(zmq_ctx, node.spec.control_endpoint, "status", timeout_s=2)
        assert status["workers"][0]["slots"] == 2 and status["requests"]["completed"] == 3
        client.close()


def test_the_router_s_public_port_takes_no_mesh_view(zmq_ctx: zmq.Context) -> None:
    """Wave 1: views injected on the public port redirected 17 of 40 requests, and one with
    `models: null` made every request and /health answer 503."""
    with make_node("fake:delay_ms=1") as node:
        wait_ready(zmq_ctx, node)
        client = Client(zmq_ctx, node)
        forged = PeerRow(
            node_id="evil", host="127.0.0.1", state="alive", rtt_ms=0.1, role="serving",
            models=["fake"], incarnation=1, zmq_port=1, load=Load(slots=100),
        )  # fmt: skip
        for _ in range(5):
            client.sock.send(encode(MeshView(peers=[forged])))
        for _ in range(5):
            events = client.until_terminal(client.send(prompt="x", max_tokens=2))
            assert isinstance(events[-1], Finished), events[-1]
            assert events[1].node_id == "test-node"  # type: ignore[attr-defined]
        status = ask(zmq_ctx, node.spec.control_endpoint, "status", timeout_s=2)
        assert status["actors"]["router"]["refused_frames"] == 5
        assert set(status["actors"]) == {"router", "control", "worker-0"}  # (no gossip actor here)
        assert status["mesh_models"] == ["fake"]
        client.close()


def test_a_request_whose_handling_raises_ends_with_an_error_and_is_forgotten(zmq_ctx: zmq.Context) -> None:
    """Wave 1: an exception after `Accepted` left the request with keep-alives forever. Here a
    peer in this node's own view has an address no socket can connect to: placing a request on it
    raises inside the router."""
    with make_node("fake:delay_ms=1") as node:
        wait_ready(zmq_ctx, node)
        inside = make_socket(node.ctx, zmq.DEALER)  # inproc: this node's own context, as gossip
        inside.connect(node.router_local_endpoint)
        broken = PeerRow(
            node_id="broken", host="no such host!", state="alive", rtt_ms=0.1, role="serving",
            models=["other"], incarnation=1, zmq_port=1, load=Load(slots=1),
        )  # fmt: skip
        inside.send(encode(MeshView(peers=[broken])))
        rid = uuid.uuid4().hex
        inside.send(encode(Generate(request_id=rid, model="other", prompt="x")))
        replies: list[object] = []
        while not replies or not isinstance(replies[-1], TERMINAL_TYPES):
            if not inside.poll(5000):
                inside.close()
                raise AssertionError("the request was never ended")
            replies.append(decode(inside.recv()))
        assert isinstance(replies[0], Accepted)
        assert isinstance(replies[-1], ErrorReply) and replies[-1].code == "internal_error"
        status = ask(zmq_ctx, node.spec.control_endpoint, "status", timeout_s=2)
        assert status["actors"]["router"]["handler_errors"] >= 1 and status["handler_errors"] >= 1
        assert status["requests"]["in_flight"] == 0 and status["requests"]["failed"] == 1
        inside.close()


def test_counters_add_up_across_completions_cancels_failures_and_429s(zmq_ctx: zmq.Context) -> None:
    with make_node("fake:delay_ms=20") as node:
        wait_ready(zmq_ctx, node)
        client = Client(zmq_ctx, node)
        rids = [client.send(prompt="x", max_tokens=10) for _ in range(4)]  # 1 running, 2 queued, 1 429
        cancelled = client.send(prompt="x", max_tokens=1000)
        client.sock.send(encode(Cancel(request_id=cancelled)))
        client.until_all_terminal(rids)
        wait_ready(zmq_ctx, node)
        requests = ask(zmq_ctx, node.spec.control_endpoint, "status", timeout_s=2)["requests"]
        assert requests["rejected_overload"] == 2, "the 4th and the cancelled one found the queue full"
        assert requests["completed"] == 3 and requests["cancelled"] == 0 and requests["failed"] == 0
        assert requests["admitted"] == 3 + requests["in_flight"]
        client.close()


def test_workers_are_added_and_retired_on_a_running_node(zmq_ctx: zmq.Context) -> None:
    with make_node("fake:delay_ms=1") as node:
        wait_ready(zmq_ctx, node)
        client = Client(zmq_ctx, node)
        second = node.add_worker(ModelSpec(source="fake:id=second,delay_ms=1", model_id="second"))
        status = lambda: ask(zmq_ctx, node.spec.control_endpoint, "status", timeout_s=2)  # noqa: E731
        eventually(lambda: status()["workers"][-1]["state"] == "ready", show=status)
        rid = uuid.uuid4().hex
        client.sock.send(encode(Generate(request_id=rid, model="second", prompt="x", max_tokens=2)))
        assert isinstance(client.until_terminal(rid)[-1], Finished)
        node.retire_worker(second.worker_id)
        status = ask(zmq_ctx, node.spec.control_endpoint, "status", timeout_s=2)
        assert [w["model"] for w in status["workers"]] == ["fake"] and status["models"] == ["fake"]
        rid = uuid.uuid4().hex
        client.sock.send(encode(Generate(request_id=rid, model="second", prompt="x")))
        reply = client.until_terminal(rid)[-1]
        assert isinstance(reply, ErrorReply) and reply.code == "model_not_found"
        assert isinstance(client.until_terminal(client.send(prompt="x", max_tokens=2))[-1], Finished)
        client.close()

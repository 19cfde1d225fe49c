"""The engine child's outbox: a request's chunks merged per stream interval, nothing lost or
reordered; and the worker's end of the pipe, which takes a message's frames one event each."""

from __future__ import annotations

import zmq

from actors import Chunk, ErrorReply, Finished, Started, decode, encode
from actors.engine._outbox import Outbox
from actors.shard._worker import ShardWorker
from actors.wire._codec import Message
from actors.wire._messages import EngineSpec, Generate


class Pipe:
    """Stands in for the child's PAIR socket: keeps what is sent, message by message."""

    def __init__(self) -> None:
        self.messages: list[list[bytes]] = []

    def send(self, frame: bytes) -> None:
        self.messages.append([frame])

    def send_multipart(self, frames: list[bytes]) -> None:
        self.messages.append(list(frames))

    def sent(self) -> list[Message]:
        out = [decode(f) for frames in self.messages for f in frames]
        self.messages.clear()
        return out


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def chunk(rid: str, text: str, token: int) -> Chunk:
    return Chunk(request_id=rid, text=text, n_tokens=1, tokens=[token])


def done(rid: str) -> Finished:
    return Finished(request_id=rid, finish_reason="stop", prompt_tokens=1, completion_tokens=3)


def outbox(interval_s: float) -> tuple[Outbox, Pipe, Clock]:
    pipe, clock = Pipe(), Clock()
    return Outbox(pipe, interval_s, clock), pipe, clock  # type: ignore[arg-type]


def test_the_first_chunk_goes_at_once_and_later_ones_are_merged_until_the_interval_passes() -> None:
    box, pipe, clock = outbox(0.05)
    box.put(Started(request_id="a", prompt_tokens=3))
    box.put(chunk("a", "x", 1))
    assert [type(m) for m in pipe.sent()] == [Started, Chunk]
    clock.now += 0.01
    box.put(chunk("a", "y", 2))
    clock.now += 0.01
    box.put(chunk("a", "z", 3))
    assert pipe.sent() == [] and box.holding == 1
    box.flush_due()
    assert pipe.sent() == [] and box.holding == 1
    clock.now += 0.04  # 0.06 s since the last flush
    box.put(chunk("a", "w", 4))
    box.flush_due()
    (merged,) = pipe.sent()
    assert merged == Chunk(request_id="a", text="yzw", n_tokens=3, tokens=[2, 3, 4])


def test_an_end_or_an_error_sends_the_held_chunk_first() -> None:
    box, pipe, _ = outbox(1.0)
    for rid in ("a", "b"):
        box.put(chunk(rid, "1", 1))
        box.put(chunk(rid, "2", 2))
    pipe.sent()
    box.put(done("a"))
    box.put(ErrorReply(request_id="b", code="engine_failed", message="x"))
    sent = pipe.sent()
    assert [(type(m).__name__, m.request_id) for m in sent] == [
        ("Chunk", "a"), ("Finished", "a"), ("Chunk", "b"), ("ErrorReply", "b"),
    ]  # fmt: skip
    assert box.holding == 0
    box.put(chunk("a", "3", 3))  # a request id seen again is a new request: its first chunk goes at once
    assert len(pipe.sent()) == 1


def test_held_chunks_go_out_when_due_even_if_no_token_follows_soon() -> None:
    box, pipe, clock = outbox(0.05)
    box.put(chunk("a", "1", 1))
    box.put(chunk("a", "2", 2))
    pipe.sent()
    box.flush_due()
    assert pipe.sent() == []
    clock.now += 0.06
    box.flush_due()  # before a long step (another request's prompt)
    assert [m.text for m in pipe.sent()] == ["2"]  # type: ignore[attr-defined]


def test_an_interval_of_zero_sends_every_chunk_as_it_comes() -> None:
    box, pipe, _ = outbox(0.0)
    for i in range(5):
        box.put(chunk("a", str(i), i))
        box.flush_due()
    assert [m.text for m in pipe.sent()] == ["0", "1", "2", "3", "4"]  # type: ignore[attr-defined]


def test_every_request_s_held_chunks_go_out_together_so_each_hop_wakes_once() -> None:
    box, pipe, clock = outbox(0.05)
    for rid in ("a", "b", "c"):
        box.put(chunk(rid, "first", 0))
    pipe.sent()
    for step in range(1, 4):  # three steps of 20 ms, each with a token of every request
        clock.now += 0.02
        for rid in ("a", "b", "c"):
            box.put(chunk(rid, str(step), step))
        box.flush_due()  # after the step
        if step < 3:
            assert pipe.messages == []
    assert len(pipe.messages) == 1  # one message, a frame per request
    sent = pipe.sent()
    assert sorted((m.request_id, m.text) for m in sent) == [("a", "123"), ("b", "123"), ("c", "123")]  # type: ignore[attr-defined]


def test_the_worker_relays_each_frame_of_an_engine_message_and_drops_only_a_bad_one(
    zmq_ctx: zmq.Context,
) -> None:
    worker = ShardWorker(
        zmq_ctx, "w", spec=EngineSpec(model="fake:", model_id="m"), router_endpoint="inproc://r"
    )
    router = Pipe()
    worker._router = router  # type: ignore[assignment]
    for rid in ("a", "b", "c"):
        worker._current[rid] = Generate(request_id=rid, model="m", prompt="hi")
    worker._from_engine(
        [encode(chunk("a", "x", 1)), b"\xffnot a frame", encode(done("b")), encode(chunk("z", "?", 2))]
    )
    assert [(type(m).__name__, m.request_id) for m in router.sent()] == [("Chunk", "a"), ("Finished", "b")]
    assert worker.stats["dropped_frames"] == 1  # the bad frame; "z" is no request of this worker's
    assert sorted(worker._current) == ["a", "c"]  # "b" ended

"""The wire codec: every kind round-trips; garbage raises ProtocolError and nothing else."""

from __future__ import annotations

import random

import msgpack
import pytest

from actors import PROTOCOL_VERSION, ProtocolError, decode, encode
from actors.wire._messages import (
    MESSAGE_TYPES,
    Chunk,
    Echo,
    EngineSpec,
    ErrorReply,
    Generate,
    Heartbeat,
    Load,
    MeshView,
    PeerRow,
    ViewRow,
    WorkerState,
)

BEAT = Heartbeat(
    node_id="n", instance="i", mesh="m", incarnation=2**63 - 1, host="10.0.0.1", zmq_port=9338,
    http_port=9337, role="serving", models=["m"], load=Load(in_flight=1, queued=0, slots=4), sent_at=1.5,
    echoes={"p": Echo(sent_at=1.0, held_s=0.01)}, view=[ViewRow(node_id="p", state="suspect", incarnation=3)],
    rtts={"p": 0.4},
)  # fmt: skip

SAMPLES = [
    Generate(request_id="r1", model="m", prompt="hi", max_tokens=3, temperature=0.0, seed=7, stop=["\n"]),
    Generate(request_id="r2", model="m", messages=[{"role": "user", "content": "yo"}]),
    Chunk(request_id="r1", text="héllo ✓", n_tokens=2),
    ErrorReply(request_id="r1", code="overloaded", message="full", details={"retry_after": 2}),
    WorkerState(worker_id="w", model_id="m", state="ready", engine_pid=None),
    Chunk(request_id="r1", text="x", n_tokens=2, tokens=[5, 2**40]),
    BEAT,
    MeshView(peers=[PeerRow(node_id="p", host="h", state="alive", rtt_ms=None, role="serving", models=[],
                            incarnation=1, load=Load(slots=2))]),
    EngineSpec(model="fake:", model_id="fake", draft=None),
]  # fmt: skip


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.KIND)
def test_every_sample_round_trips_unchanged(message: object) -> None:
    assert decode(encode(message)) == message


def test_every_message_kind_has_a_sample_or_defaults_that_round_trip() -> None:
    kinds = {m.KIND for m in SAMPLES}
    assert len({cls.KIND for cls in MESSAGE_TYPES}) == len(MESSAGE_TYPES), "kinds must be unique"
    assert kinds <= {cls.KIND for cls in MESSAGE_TYPES}


def _chunk(**fields: object) -> bytes:
    base = {"request_id": "r", "text": "t", "n_tokens": 1}
    return msgpack.packb([PROTOCOL_VERSION, "chunk", {**base, **fields}])  # type: ignore[no-any-return]


def _beat(**fields: object) -> bytes:
    """A heartbeat frame with some fields replaced by raw (possibly hostile) values."""
    good = msgpack.unpackb(encode(BEAT), raw=False)
    return msgpack.packb([PROTOCOL_VERSION, "heartbeat", {**good[2], **fields}])  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xc1",  # a msgpack byte that is never valid
        b"not msgpack at all",
        msgpack.packb([PROTOCOL_VERSION + 1, "chunk", {"request_id": "r", "text": "t", "n_tokens": 1}]),
        msgpack.packb([PROTOCOL_VERSION, "no-such-kind", {}]),
        msgpack.packb([PROTOCOL_VERSION, "chunk", ["not", "a", "map"]]),
        msgpack.packb([PROTOCOL_VERSION, "chunk", {"request_id": "r", "text": 5, "n_tokens": 1}]),
        msgpack.packb([PROTOCOL_VERSION, "chunk", {"request_id": "r", "text": "t"}]),
        msgpack.packb([PROTOCOL_VERSION, "chunk", {"request_id": "r", "text": "t", "n_tokens": 1, "x": 1}]),
        msgpack.packb([PROTOCOL_VERSION, "chunk", {"request_id": "r", "text": "t", "n_tokens": True}]),
        msgpack.packb([PROTOCOL_VERSION, "generate", {"request_id": "r", "model": "m", "stop": [1]}]),
        msgpack.packb({"a": 1}),
        msgpack.packb([PROTOCOL_VERSION, "chunk"]),
        msgpack.packb([PROTOCOL_VERSION, 12, {}]),
        msgpack.packb([PROTOCOL_VERSION, "chunk", {1: 2}]),
        # keys of both kinds msgpack allows: wave 1 raised TypeError sorting them
        msgpack.packb([PROTOCOL_VERSION, "chunk", {b"x": 1, "y": 2}], use_bin_type=True),
        _chunk(n_tokens=2**64 - 1),  # msgpack carries it; no peer could send it back
        _chunk(tokens=["a"]),
        _chunk(tokens=[2**63]),
        _beat(load={"in_flight": "x"}),
        _beat(load=None),
        _beat(incarnation=2**64 - 1),
        _beat(sent_at=float("nan")),
        _beat(rtts={"p": float("inf")}),
        _beat(view=[["p", "alive", 1, "h", 1]]),
        _beat(view=[{"node_id": "p", "state": "zombie", "incarnation": 1}]),
        _beat(echoes={"p": [1.0, 2.0]}),
        _beat(echoes={"p": {"sent_at": 1.0}}),
    ],
)
def test_malformed_frames_raise_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(frame)


def test_oversized_frames_are_refused_before_parsing() -> None:
    frame = encode(Chunk(request_id="r", text="x" * 1000, n_tokens=1))
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(frame, max_bytes=100)


def test_random_and_mutated_bytes_never_raise_anything_but_protocol_error() -> None:
    rng = random.Random(1234)
    valid = [encode(m) for m in SAMPLES]  # nested records included
    for i in range(5000):
        if i % 2:
            frame = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        else:
            frame = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 4)):
                frame[rng.randrange(len(frame))] = rng.randrange(256)
            frame = bytes(frame)
        try:
            decode(frame)
        except ProtocolError:
            pass


def test_the_fast_check_and_the_walk_that_names_the_field_agree_on_every_mutated_frame() -> None:
    """`decode` checks a frame with compiled checkers, and walks a bad one again to say where it
    is wrong: both must take and refuse the same frames, and build the same message."""
    from actors.wire._codec import _BY_KIND, _Bad, _checker, _record

    rng = random.Random(99)
    wrong = [None, True, -1, 2**63, 1.5, float("nan"), "x", b"x", [], [1, "a"], {}, {"k": 1}, {1: 2}]
    agreed = refused = 0
    for _ in range(3000):
        _version, kind, fields = msgpack.unpackb(encode(rng.choice(SAMPLES)), raw=False)
        for _ in range(rng.randrange(0, 3)):  # some fields get a value of another type
            fields[rng.choice([*fields, "unknown"])] = rng.choice(wrong)
        if fields and rng.random() < 0.1:
            del fields[rng.choice(list(fields))]
        cls = _BY_KIND[kind]
        try:
            fast = _checker(cls)(fields)
        except _Bad:
            fast = None
        try:
            slow = _record(cls, fields, kind)
        except ProtocolError:
            slow = None
        assert fast == slow, (kind, fields)
        agreed += 1
        refused += slow is None
    assert 0 < refused < agreed  # both outcomes were exercised


def test_a_refused_frame_says_which_field_is_wrong() -> None:
    with pytest.raises(ProtocolError, match=r"chunk\.tokens\[1\]"):
        decode(_chunk(tokens=[1, "a"]))
    with pytest.raises(ProtocolError, match=r"heartbeat\.load\.in_flight"):
        decode(_beat(load={"in_flight": "x", "queued": 0, "slots": 4}))

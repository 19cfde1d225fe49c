"""The engine child process: loads one model and serves the shard-worker over a PAIR socket.

Run as `python -m actors.engine._child --endpoint E --parent-pid P --spec SPEC`. It announces itself with
`EngineReady` (or an `ErrorReply` if loading fails, then exits), admits up to `slots` requests,
and between decode steps takes in new requests and cancels. What it says goes out through an
`Outbox`, which merges a request's tokens into one frame per stream interval. It dies with its parent
(PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import sys

import zmq

from actors._errors import EngineFailed, ProtocolError, RequestError
from actors.engine._build import load_engine
from actors.engine._engine import Engine
from actors.engine._outbox import Outbox
from actors.runtime._supervisor import die_with_parent
from actors.wire._codec import decode, encode
from actors.wire._messages import Cancel, EngineReady, EngineSpec, ErrorReply, Finished, Generate
from actors.wire._sockets import make_socket

log = logging.getLogger("mesh_llm.engine")


def serve(sock: zmq.Socket, engine: Engine, outbox: Outbox) -> None:
    """Answer requests until we are killed: take in what arrived, then advance one step."""
    while True:
        # Block while idle; between steps only look at what is already there.
        if sock.poll(None if engine.active == 0 else 0):
            for message in _drain(sock):
                _handle(engine, message, outbox)
        if engine.active:
            outbox.flush_due()
            for event in engine.step():
                outbox.put(event)
            outbox.flush_due()


def _handle(engine: Engine, message: object, outbox: Outbox) -> None:
    if isinstance(message, Generate):
        try:
            events = engine.admit(message)
        except RequestError as err:
            reply = ErrorReply(
                request_id=message.request_id, code=err.code, message=err.message, details=err.details
            )
            outbox.put(reply)
            return
        for event in events:
            outbox.put(event)
    elif isinstance(message, Cancel) and engine.cancel(message.request_id):
        done = Finished(
            request_id=message.request_id, finish_reason="cancelled", prompt_tokens=0, completion_tokens=0
        )
        outbox.put(done)


def _drain(sock: zmq.Socket) -> list[object]:
    """Every message waiting on the socket, bad frames dropped (and logged)."""
    messages = []
    while sock.poll(0):
        try:
            messages.append(decode(sock.recv()))
        except ProtocolError as err:
            log.warning("dropped a bad frame from the worker: %s", err)
    return messages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mesh-llm-engine")
    parser.add_argument("--endpoint", required=True, help="the shard-worker's PAIR socket")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--spec", required=True, help="an encoded EngineSpec frame, base64")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s engine[%(process)d] %(levelname)s %(message)s"
    )
    die_with_parent(args.parent_pid)
    spec = decode(base64.b64decode(args.spec))
    if not isinstance(spec, EngineSpec):
        raise SystemExit(f"mesh-llm-engine: --spec holds a {type(spec).__name__}, not an EngineSpec")
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.PAIR)
    sock.connect(args.endpoint)
    try:
        engine = load_engine(spec)
    except Exception as err:
        failed = ErrorReply(request_id="", code=EngineFailed.code, message=f"cannot load {spec.model}: {err}")
        sock.send(encode(failed))
        sock.close(linger=1000)
        return 3
    ready = EngineReady(
        model_id=engine.model_id,
        n_ctx=engine.n_ctx,
        n_params=engine.n_params,
        pid=os.getpid(),
        slots=engine.slots,
    )
    sock.send(encode(ready))
    serve(sock, engine, Outbox(sock, spec.stream_interval_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())

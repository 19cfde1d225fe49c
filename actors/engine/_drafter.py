"""The speculative-drafter actor: a small draft model next to the target, in the engine child.

It owns a `DraftModel` (a draft GGUF in its own llama.cpp context, one sequence per engine slot)
and answers `DraftRequest`s from the engine over an inproc PAIR socket. Each sequence's draft KV
cache is kept in step with the target's accepted text: a request says how much of it to keep and
what to append, so no step re-evaluates the whole prefix. `DraftClient` is the engine's side.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import zmq

from actors._errors import ProtocolError
from actors.engine._llamacpp import add_token, logits_reader, open_context
from actors.runtime._actor import Actor
from actors.wire._codec import decode, encode
from actors.wire._messages import Drafted, DraftRequest
from actors.wire._sockets import make_socket

log = logging.getLogger(__name__)


def draft_threads(n_threads: int, cpus: int | None = None) -> int:
    """The threads a draft model decodes with beside a target decoding with `n_threads`: as many
    as fit on the CPUs the target leaves, else one.

    llama.cpp's CPU backend runs a decode's threads as an OpenMP team, one team for each thread
    that decodes, and the drafter actor's thread is a second one. Once a process's teams hold more
    threads than it has CPUs, libgomp all but stops spinning at barriers (100 spins, then a futex
    wait), and every decode of both models pays, for the rest of the process's life. Measured (100M
    f16 target, 2-layer draft, 2 cores): the target's plain decodes took 6.5-6.7 ms a token, and
    8.7-9.0 once a 2-thread draft model had decoded; with a 1-thread draft (no team) 6.5, and
    drafted requests were faster too (7.1-8.2 ms a token against 9.3-9.8)."""
    cpus = len(os.sched_getaffinity(0)) if cpus is None else cpus
    return max(1, min(n_threads, cpus - n_threads))


class DraftModel:
    """A draft GGUF serving `slots` sequences; every call blocks and runs on one thread."""

    def __init__(self, path: str, *, n_ctx: int, n_threads: int, slots: int, n_batch: int = 512) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=path, n_ctx=64, n_batch=64, n_threads=n_threads, n_gpu_layers=0, verbose=False
        )
        self._ctx, self._memory, self._batch = open_context(
            llama_cpp, self.llm.model, n_ctx=n_ctx, slots=slots, n_batch=n_batch, n_threads=n_threads
        )
        self.n_ctx, self._n_batch = n_ctx, n_batch
        self._cached: list[list[int]] = [[] for _ in range(slots)]
        self._logits = logits_reader(llama_cpp, self.llm.n_vocab())  # drafts are greedy: the argmax

    def draft(self, rows: list[list[Any]]) -> list[list[Any]]:
        """Answer each `[seq_id, keep, append, n]` row with `[seq_id, drafts, cached length]`."""
        return [self._draft_one(*_checked(row, len(self._cached))) for row in rows]

    def _draft_one(self, seq: int, keep: int, append: list[int], n: int) -> list[Any]:
        cached = self._cached[seq]
        keep = min(keep, len(cached))
        if not append:  # logits are needed for the last token: feed it again
            if keep == 0:
                return [seq, [], 0]
            keep, append = keep - 1, cached[keep - 1 : keep]
        self._lib.llama_memory_seq_rm(self._memory, seq, keep, -1)
        del cached[keep:]
        n = max(0, min(n, self.n_ctx - len(cached) - len(append) - 1))
        index = self._feed(seq, append)
        drafts: list[int] = []
        while len(drafts) < n:
            token = int(self._logits(self._ctx, index).argmax())
            drafts.append(token)
            if len(drafts) < n:
                index = self._feed(seq, [token])
        return [seq, drafts, len(cached)]

    def _feed(self, seq: int, tokens: list[int]) -> int:
        """Decode `tokens` after the sequence's cache, in batches; the batch index of the last."""
        cached, lib, batch = self._cached[seq], self._lib, self._batch
        for start in range(0, len(tokens), self._n_batch):
            chunk = tokens[start : start + self._n_batch]
            batch.n_tokens = 0
            for i, token in enumerate(chunk):
                add_token(batch, token, len(cached) + i, seq, i == len(chunk) - 1)
            if lib.llama_decode(self._ctx, batch) != 0:
                raise RuntimeError("llama_decode failed in the draft model")
            cached += chunk
        return int(batch.n_tokens) - 1


def _checked(row: Any, slots: int) -> tuple[int, int, list[int], int]:
    """A request row, or `ProtocolError`: the engine is trusted, but a drafter never crashes."""
    try:
        seq, keep, append, n = row
        ok = (
            isinstance(seq, int)
            and 0 <= seq < slots
            and isinstance(keep, int)
            and keep >= 0
            and isinstance(n, int)
            and isinstance(append, list)
            and all(isinstance(t, int) for t in append)
        )
    except (TypeError, ValueError) as err:
        raise ProtocolError(f"bad draft row {row!r}") from err
    if not ok:
        raise ProtocolError(f"bad draft row {row!r}")
    return seq, keep, append, n


class SpeculativeDrafter(Actor):
    """Hosts a `DraftModel` and answers `DraftRequest` with `Drafted` on `endpoint`."""

    def __init__(self, ctx: zmq.Context, model: DraftModel, endpoint: str, **kwargs: Any) -> None:
        super().__init__(ctx, "drafter", **kwargs)
        self.model = model
        self.endpoint = endpoint

    def setup(self) -> None:
        sock = self.socket(zmq.PAIR)
        sock.bind(self.endpoint)
        self.on_socket(sock, lambda frames: self._on_request(sock, frames))

    def _on_request(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        request = self.decode(frames[-1], "engine")
        rows: list[list[Any]] = []
        if isinstance(request, DraftRequest):
            try:
                rows = self.model.draft(request.rows)
            except ProtocolError as err:
                self.stats["dropped_frames"] += 1
                self.warn_once("bad-row", "drafter: %s", err)
        sock.send(encode(Drafted(rows=rows)))


class DraftClient:
    """The engine's side: one blocking request at a time. A drafter that does not answer within
    `timeout_s` is given up on (drafting stops; decoding goes on plainly)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, timeout_s: float = 5.0) -> None:
        self._sock = make_socket(ctx, zmq.PAIR)
        self._sock.connect(endpoint)
        self.timeout_ms = int(timeout_s * 1000)
        self.failed = False

    def draft(self, rows: list[list[Any]]) -> dict[int, tuple[list[int], int]]:
        """`{seq_id: (drafts, cached length)}` for the rows asked, {} if the drafter failed."""
        if self.failed:
            return {}
        self._sock.send(encode(DraftRequest(rows=rows)))
        if not self._sock.poll(self.timeout_ms):
            log.error("the speculative drafter did not answer in %d ms: drafting stops", self.timeout_ms)
            self.failed = True
            return {}
        reply = decode(self._sock.recv())
        if not isinstance(reply, Drafted):
            return {}
        return {int(seq): (list(tokens), int(cached)) for seq, tokens, cached in reply.rows}

    def close(self) -> None:
        self._sock.close(linger=0)

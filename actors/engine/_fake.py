"""`FakeEngine` (model spec `fake:...`): the engine's contract with controllable delay, crash
and hang, for tests. Runs inside an engine child process like the real one."""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass

from actors._errors import InvalidRequest
from actors.engine._engine import EngineEvent, check_context, closing_events
from actors.engine._textstream import TextStream
from actors.wire._messages import Chunk, Finished, Generate, Started, TokenLogprob, TopLogprob


@dataclass(slots=True)
class _FakeRun:
    request: Generate
    max_tokens: int
    stream: TextStream
    n_prompt: int
    n_done: int = 0
    first: int = 0  # the id (and word number) of its first token


class FakeEngine:
    """A stand-in with the engine's contract: words ` w0 w1 …`, one per token and step.

    Spec `fake:key=value,...`: `delay_ms` per step, `slots`, `n_ctx`, `id` (the model id),
    `crash_after` / `hang_after` tokens of a request (the process exits / sleeps forever; 0 means
    on admission, as in a long prompt evaluation), `load_s` (time to load), `fail_load`.
    """

    def __init__(self, spec: str) -> None:
        opts = dict(kv.split("=", 1) for kv in spec.removeprefix("fake:").split(",") if "=" in kv)
        self.model_id = opts.get("id", "fake")
        self.n_ctx = int(opts.get("n_ctx", 512))
        self.slots = int(opts.get("slots", 1))
        self.n_params = 0
        self.delay_s = float(opts.get("delay_ms", 0)) / 1000
        self.crash_after = int(opts.get("crash_after", -1))
        self.hang_after = int(opts.get("hang_after", -1))
        self._runs: dict[str, _FakeRun] = {}
        time.sleep(float(opts.get("load_s", 0)))
        if opts.get("fail_load"):
            raise RuntimeError("fake engine told to fail loading")

    @property
    def active(self) -> int:
        return len(self._runs)

    def _misbehave_at(self, n_tokens: int) -> None:
        if n_tokens == self.crash_after:
            os._exit(17)
        while n_tokens == self.hang_after:
            time.sleep(3600)

    def admit(self, request: Generate) -> list[EngineEvent]:
        text = request.prompt if request.prompt is not None else str(request.messages)
        n_prompt = len(text.split()) + len(request.resume_tokens)
        max_tokens = check_context(self.n_ctx, n_prompt, request.max_tokens)
        if len(self._runs) >= self.slots:
            raise InvalidRequest(f"all {self.slots} slots are busy")
        self._misbehave_at(0)
        if request.embed:  # a unit vector that depends on the text only
            digest = hashlib.sha256(text.encode()).digest()
            raw = [b - 127.5 for b in digest[:8]]
            norm = math.sqrt(sum(x * x for x in raw))
            rid = request.request_id
            return [
                Started(request_id=rid, prompt_tokens=n_prompt),
                Finished(
                    request_id=rid, finish_reason="stop", prompt_tokens=n_prompt, completion_tokens=0,
                    embedding=[x / norm for x in raw],
                ),
            ]  # fmt: skip
        first = request.resume_tokens[-1] + 1 if request.resume_tokens else 0  # token k is " wk"
        self._runs[request.request_id] = _FakeRun(
            request, max_tokens, TextStream(request.stop), n_prompt, first=first
        )
        return [Started(request_id=request.request_id, prompt_tokens=n_prompt)]

    def cancel(self, request_id: str) -> bool:
        return self._runs.pop(request_id, None) is not None

    def step(self) -> list[EngineEvent]:
        time.sleep(self.delay_s)
        events: list[EngineEvent] = []
        for rid, run in list(self._runs.items()):
            self._misbehave_at(run.n_done + 1)
            token = run.first + run.n_done
            piece, stopped = run.stream.feed(f" w{token}".encode())
            run.n_done += 1
            logprobs = []
            if run.request.logprobs >= 0:  # the fake is certain of every word it writes
                word = f" w{token}".encode()
                top = [TopLogprob(piece=word, logprob=0.0)][: run.request.logprobs]
                logprobs = [TokenLogprob(piece=word, logprob=0.0, top=top)]
            events.append(Chunk(request_id=rid, text=piece, n_tokens=1, tokens=[token], logprobs=logprobs))
            if stopped or run.n_done >= run.max_tokens:
                reason = "stop" if stopped else "length"
                events += closing_events(rid, run.stream, [], reason, run.n_prompt, run.n_done)
                del self._runs[rid]
        return events

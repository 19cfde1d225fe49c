"""Engines: what a shard-worker's child process runs. The `Engine` protocol; `LlamaEngine`
(in `_llama_engine`) wraps llama.cpp; `FakeEngine` (model spec `fake:...`) has controllable
delay, crash and hang for tests. Both run inside the engine child process only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from actors._errors import ContextOverflow, InvalidRequest
from actors._messages import Chunk, Finished, Generate, Started
from actors._textstream import TextStream

EngineEvent = Started | Chunk | Finished


class Engine(Protocol):
    """A loaded model serving up to `slots` requests at once, advanced one step at a time.

    `admit` raises a `RequestError` for a request it cannot serve; every admitted request ends
    with one `Finished` from `step()`, or with `cancel()`.
    """

    model_id: str
    n_ctx: int
    n_params: int
    slots: int

    @property
    def active(self) -> int:
        """How many admitted requests are not finished."""
        ...

    def admit(self, request: Generate) -> list[EngineEvent]:
        """Take a request into a free slot; returns its `Started`."""
        ...

    def cancel(self, request_id: str) -> bool:
        """Drop a request; True if the engine held it."""
        ...

    def step(self) -> list[EngineEvent]:
        """Advance every active request by (at most) one token; blocks while computing."""
        ...


def model_id_of(path: str | Path) -> str:
    """A model's id: its GGUF file name without `.gguf`."""
    name = Path(path).name
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def check_context(n_ctx: int, n_prompt: int, max_tokens: int | None) -> int:
    """The completion budget for a prompt, or `ContextOverflow` with OpenAI's wording."""
    if max_tokens is None:
        max_tokens = n_ctx - n_prompt
    if n_prompt + max_tokens > n_ctx or max_tokens < 1:
        total = n_prompt + max(max_tokens, 1)
        raise ContextOverflow(
            f"This model's maximum context length is {n_ctx} tokens. However, you requested "
            f"{total} tokens ({n_prompt} in the prompt, {max(max_tokens, 1)} for the "
            "completion). Please reduce the length of the prompt or of max_tokens.",
            n_ctx=n_ctx,
            prompt_tokens=n_prompt,
            max_tokens=max_tokens,
        )
    return max_tokens


def render_chat(template: str, messages: list[dict[str, Any]], bos: str, eos: str) -> str:
    """Render messages with a GGUF's Jinja chat template, as Hugging Face tokenizers do."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        text = env.from_string(template).render(
            messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos
        )
    except Exception as err:  # a template may raise on roles it does not know
        raise InvalidRequest(f"the chat template rejected the messages: {err}", param="messages") from err
    # The tokenizer adds BOS itself; a template that writes it too would double it.
    return text[len(bos) :] if bos and text.startswith(bos) else text


@dataclass(slots=True)
class _FakeRun:
    request: Generate
    max_tokens: int
    stream: TextStream
    n_prompt: int
    n_done: int = 0


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
        text = (request.prompt if request.prompt is not None else str(request.messages)) + request.resume_text
        n_prompt = len(text.split())
        max_tokens = check_context(self.n_ctx, n_prompt, request.max_tokens)
        if len(self._runs) >= self.slots:
            raise InvalidRequest(f"all {self.slots} slots are busy")
        self._misbehave_at(0)
        self._runs[request.request_id] = _FakeRun(request, max_tokens, TextStream(request.stop), n_prompt)
        return [Started(request_id=request.request_id, prompt_tokens=n_prompt)]

    def cancel(self, request_id: str) -> bool:
        return self._runs.pop(request_id, None) is not None

    def step(self) -> list[EngineEvent]:
        time.sleep(self.delay_s)
        events: list[EngineEvent] = []
        for rid, run in list(self._runs.items()):
            self._misbehave_at(run.n_done + 1)
            piece, stopped = run.stream.feed(f" w{run.n_done}".encode())
            run.n_done += 1
            events.append(Chunk(request_id=rid, text=piece, n_tokens=1))
            if stopped or run.n_done >= run.max_tokens:
                reason = "stop" if stopped else "length"
                events += closing_events(rid, run.stream, 0, reason, run.n_prompt, run.n_done)
                del self._runs[rid]
        return events


def closing_events(
    rid: str, stream: TextStream, n_unsent: int, reason: str, n_prompt: int, n_done: int
) -> list[EngineEvent]:
    """The last events of a request: withheld text (if any), then `Finished`."""
    events: list[EngineEvent] = []
    tail = stream.flush()
    if tail or n_unsent:
        events.append(Chunk(request_id=rid, text=tail, n_tokens=n_unsent))
    done = Finished(request_id=rid, finish_reason=reason, prompt_tokens=n_prompt, completion_tokens=n_done)
    return [*events, done]


def load_engine(
    model: str, *, n_ctx: int, n_threads: int, slots: int, draft: str | None = None, speculative: str = ""
) -> Engine:
    """The engine for a model spec: a GGUF path, or `fake:...` for tests; `draft` and
    `speculative` set up speculative decoding (llama.cpp engines only)."""
    if model.startswith("fake:"):
        return FakeEngine(model)
    from actors._llama_engine import LlamaEngine

    return LlamaEngine(
        model, n_ctx=n_ctx, n_threads=n_threads, slots=slots, draft=draft, speculative=speculative
    )

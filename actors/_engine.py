"""Engines: what a shard-worker's child process runs. `LlamaEngine` wraps llama.cpp;
`FakeEngine` (model spec `fake:...`) has controllable delay, crash and hang for tests.

Both run inside the engine child process only; `generate` blocks and yields events.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any, Protocol

from actors._errors import ContextOverflow, InvalidRequest
from actors._messages import Chunk, Finished, Generate, Started
from actors._textstream import TextStream

EngineEvent = Started | Chunk | Finished
EngineStream = Generator[EngineEvent, None, None]  # closing it stops generation


class Engine(Protocol):
    """A loaded model that turns one request at a time into a stream of events."""

    model_id: str
    n_ctx: int
    n_params: int

    def generate(self, request: Generate) -> EngineStream:
        """Yield `Started`, then `Chunk`s, then one `Finished`; raise a `RequestError` on bad input."""
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


class LlamaEngine:
    """A GGUF model loaded in llama.cpp through llama-cpp-python."""

    def __init__(self, path: str, *, n_ctx: int, n_threads: int) -> None:
        import llama_cpp  # imported here: only engine children pay for loading llama.cpp

        self._lib = llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=path,
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            n_gpu_layers=0,
            verbose=False,
        )
        meta: dict[str, str] = self.llm.metadata
        self.model_id = meta.get("mesh_llm.source_model_id") or model_id_of(path)
        self.n_ctx = self.llm.n_ctx()
        self.n_params = int(llama_cpp.llama_model_n_params(self.llm.model))
        self._template = meta.get("tokenizer.chat_template")
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._bos = self._piece(self.llm.token_bos())
        self._eos = self._piece(self.llm.token_eos())

    def _piece(self, token: int) -> str:
        if token < 0:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def render(self, request: Generate) -> str:
        """The prompt text: the request's prompt, or its messages through the chat template."""
        if request.prompt is not None:
            return request.prompt
        if not self._template:
            raise InvalidRequest("this model has no chat template; use /v1/completions", param="messages")
        return render_chat(self._template, request.messages or [], self._bos, self._eos)

    def generate(self, request: Generate) -> EngineStream:
        text = self.render(request)
        tokens = self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        max_tokens = check_context(self.n_ctx, len(tokens), request.max_tokens)
        self.llm.set_seed(request.seed if request.seed is not None else random.getrandbits(31))
        yield Started(request_id=request.request_id, prompt_tokens=len(tokens))
        stream = TextStream(request.stop)
        finish, n_done, n_unsent = "length", 0, 0
        for token in self.llm.generate(
            tokens,
            temp=request.temperature,
            top_p=request.top_p,
            top_k=0,
            min_p=0.0,
            repeat_penalty=1.0,
            reset=True,
        ):
            if self._lib.llama_vocab_is_eog(self._vocab, token):
                finish = "stop"
                break
            n_done += 1
            n_unsent += 1
            piece, stopped = stream.feed(self.llm.detokenize([token]))
            if piece:
                yield Chunk(request_id=request.request_id, text=piece, n_tokens=n_unsent)
                n_unsent = 0
            if stopped:
                finish = "stop"
                break
            if n_done >= max_tokens:
                break
        tail = stream.flush()
        if tail or n_unsent:
            yield Chunk(request_id=request.request_id, text=tail, n_tokens=n_unsent)
        yield Finished(
            request_id=request.request_id,
            finish_reason=finish,
            prompt_tokens=len(tokens),
            completion_tokens=n_done,
        )


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


class FakeEngine:
    """A stand-in with the engine's contract: words `w0 w1 …`, one per token.

    Spec `fake:key=value,...`: `delay_ms` per token, `crash_after` tokens (the process exits),
    `hang_after` tokens (sleeps forever), `n_ctx`, `load_s` (time to load), `fail_load`.
    """

    def __init__(self, spec: str) -> None:
        opts = dict(kv.split("=", 1) for kv in spec.removeprefix("fake:").split(",") if "=" in kv)
        self.model_id = opts.get("id", "fake")
        self.n_ctx = int(opts.get("n_ctx", 512))
        self.n_params = 0
        self.delay_s = float(opts.get("delay_ms", 0)) / 1000
        self.crash_after = int(opts.get("crash_after", -1))
        self.hang_after = int(opts.get("hang_after", -1))
        time.sleep(float(opts.get("load_s", 0)))
        if opts.get("fail_load"):
            raise RuntimeError("fake engine told to fail loading")

    def _misbehave_at(self, n_tokens: int) -> None:
        """Crash or hang when `n_tokens` tokens were produced (0: before `Started`)."""
        if n_tokens == self.crash_after:
            os._exit(17)
        while n_tokens == self.hang_after:
            time.sleep(3600)

    def generate(self, request: Generate) -> EngineStream:
        text = request.prompt if request.prompt is not None else str(request.messages)
        n_prompt = len(text.split())
        max_tokens = check_context(self.n_ctx, n_prompt, request.max_tokens)
        self._misbehave_at(0)
        yield Started(request_id=request.request_id, prompt_tokens=n_prompt)
        stream = TextStream(request.stop)
        finish, n_done = "length", 0
        for i in range(max_tokens):
            self._misbehave_at(i + 1)
            time.sleep(self.delay_s)
            n_done += 1
            piece, stopped = stream.feed(f" w{i}".encode())
            yield Chunk(request_id=request.request_id, text=piece, n_tokens=1)
            if stopped:
                finish = "stop"
                break
        tail = stream.flush()
        if tail:
            yield Chunk(request_id=request.request_id, text=tail, n_tokens=0)
        yield Finished(
            request_id=request.request_id,
            finish_reason=finish,
            prompt_tokens=n_prompt,
            completion_tokens=n_done,
        )


def load_engine(model: str, *, n_ctx: int, n_threads: int) -> Engine:
    """The engine for a model spec: a GGUF path, or `fake:...` for tests."""
    if model.startswith("fake:"):
        return FakeEngine(model)
    return LlamaEngine(model, n_ctx=n_ctx, n_threads=n_threads)

"""The llama.cpp engine: continuous batching of up to `slots` sequences in one context.

Every `step()` makes one `llama_decode` call holding the next token of every generating sequence
plus as much of newly admitted prompts as the batch allows, then samples one token for each
sequence whose logits it computed. Each slot keeps the tokens in its KV cache, so a request whose
prompt extends an earlier one (the next turn of a chat) re-evaluates only the new part.
Runs inside the engine child process only; every call blocks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from actors._engine import EngineEvent, check_context, closing_events, model_id_of, render_chat
from actors._errors import InvalidRequest
from actors._messages import Chunk, Generate, Started
from actors._textstream import TextStream


@dataclass(slots=True)
class _Slot:
    """One sequence id of the context, and what its KV cache holds."""

    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV entries are present
    request: Generate | None = None
    todo: list[int] = field(default_factory=list)  # tokens to feed before the next sample
    max_tokens: int = 0
    n_done: int = 0
    n_unsent: int = 0
    n_prompt: int = 0
    sampler: Any = None
    stream: TextStream | None = None


class LlamaEngine:
    """A GGUF model in llama.cpp serving `slots` sequences at once."""

    def __init__(self, path: str, *, n_ctx: int, n_threads: int, slots: int = 1, n_batch: int = 512) -> None:
        import llama_cpp  # imported here: only engine children pay for loading llama.cpp

        self._lib = lib = llama_cpp
        # The Llama object owns the model, tokenizer and metadata; its own context stays tiny.
        self.llm = llama_cpp.Llama(
            model_path=path, n_ctx=64, n_batch=64, n_threads=n_threads, n_gpu_layers=0, verbose=False
        )
        meta: dict[str, str] = self.llm.metadata
        self.model_id = meta.get("mesh_llm.source_model_id") or model_id_of(path)
        self.n_ctx = n_ctx
        self.slots = slots
        self.n_params = int(lib.llama_model_n_params(self.llm.model))
        self._template = meta.get("tokenizer.chat_template")
        self._vocab = lib.llama_model_get_vocab(self.llm.model)
        self._bos = self._piece(self.llm.token_bos())
        self._eos = self._piece(self.llm.token_eos())
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx * slots
        params.n_seq_max = slots
        params.kv_unified = False  # each sequence gets a full n_ctx of its own
        params.n_batch = params.n_ubatch = n_batch
        params.n_threads = params.n_threads_batch = n_threads
        self._ctx = lib.llama_init_from_model(self.llm.model, params)
        if not self._ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} x {slots} tokens")
        self._memory = lib.llama_get_memory(self._ctx)
        self._n_batch = n_batch
        self._batch = lib.llama_batch_init(n_batch, 0, 1)
        self._slots = [_Slot(seq_id=i) for i in range(slots)]

    def _piece(self, token: int) -> str:
        if token < 0:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    @property
    def active(self) -> int:
        return sum(1 for s in self._slots if s.request is not None)

    def render(self, request: Generate) -> str:
        """The prompt text: the request's prompt, or its messages through the chat template."""
        if request.prompt is not None:
            return request.prompt
        if not self._template:
            raise InvalidRequest("this model has no chat template; use /v1/completions", param="messages")
        return render_chat(self._template, request.messages or [], self._bos, self._eos)

    def admit(self, request: Generate) -> list[EngineEvent]:
        """Take a request into a free slot; raises `RequestError` if it cannot be served."""
        text = self.render(request) + request.resume_text
        tokens = self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        max_tokens = check_context(self.n_ctx, len(tokens), request.max_tokens)
        free = [s for s in self._slots if s.request is None]
        if not free:
            raise InvalidRequest(f"all {self.slots} slots are busy")
        slot = max(free, key=lambda s: _common_prefix(s.cached, tokens))
        keep = min(_common_prefix(slot.cached, tokens), len(tokens) - 1)  # re-feed >= 1 token
        self._lib.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1)
        slot.cached = tokens[:keep]
        slot.todo = tokens[keep:]
        slot.request = request
        slot.max_tokens = max_tokens
        slot.n_done = slot.n_unsent = 0
        slot.n_prompt = len(tokens)
        slot.sampler = self._sampler(request)
        slot.stream = TextStream(request.stop)
        return [Started(request_id=request.request_id, prompt_tokens=len(tokens))]

    def cancel(self, request_id: str) -> bool:
        """Drop a request; True if this engine held it."""
        for slot in self._slots:
            if slot.request is not None and slot.request.request_id == request_id:
                self._release(slot)
                return True
        return False

    def step(self) -> list[EngineEvent]:
        """One decode over all active sequences; the events it produced."""
        batch, lib = self._batch, self._lib
        batch.n_tokens = 0
        sampled: list[tuple[_Slot, int]] = []
        budget = self._n_batch
        # Generating sequences first (one token each), then prompt chunks with what is left.
        for slot in sorted((s for s in self._slots if s.request is not None), key=lambda s: len(s.todo)):
            take = slot.todo[:budget]
            if not take:
                continue
            for i, token in enumerate(take):
                last = i == len(take) - 1 and len(take) == len(slot.todo)
                self._add(token, len(slot.cached) + i, slot.seq_id, last)
                if last:
                    sampled.append((slot, batch.n_tokens - 1))
            slot.cached += take
            slot.todo = slot.todo[len(take) :]
            budget -= len(take)
            if budget == 0:
                break
        if batch.n_tokens == 0:
            return []
        if lib.llama_decode(self._ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        events: list[EngineEvent] = []
        for slot, index in sampled:
            token = lib.llama_sampler_sample(slot.sampler, self._ctx, index)
            events += self._advance(slot, token)
        return events

    def _add(self, token: int, pos: int, seq_id: int, logits: bool) -> None:
        batch = self._batch
        i = batch.n_tokens
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits
        batch.n_tokens = i + 1

    def _advance(self, slot: _Slot, token: int) -> list[EngineEvent]:
        """Account for a sampled token: emit its text, and finish the request if it is done."""
        assert slot.request is not None and slot.stream is not None
        if self._lib.llama_vocab_is_eog(self._vocab, token):
            return self._finish(slot, "stop")
        slot.n_done += 1
        slot.n_unsent += 1
        text, stopped = slot.stream.feed(self.llm.detokenize([token]))
        events: list[EngineEvent] = []
        if text:
            events.append(Chunk(request_id=slot.request.request_id, text=text, n_tokens=slot.n_unsent))
            slot.n_unsent = 0
        if stopped:
            return events + self._finish(slot, "stop")
        if slot.n_done >= slot.max_tokens:
            return events + self._finish(slot, "length")
        slot.todo = [token]
        return events

    def _finish(self, slot: _Slot, reason: str) -> list[EngineEvent]:
        request, stream = slot.request, slot.stream
        assert request is not None and stream is not None
        events = closing_events(request.request_id, stream, slot.n_unsent, reason, slot.n_prompt, slot.n_done)
        self._release(slot)
        return events

    def _release(self, slot: _Slot) -> None:
        if slot.sampler is not None:
            self._lib.llama_sampler_free(slot.sampler)
        slot.request = slot.sampler = slot.stream = None
        # Fed-but-unsampled tokens are in the cache; tokens still to feed are not.
        slot.todo = []

    def _sampler(self, request: Generate) -> Any:
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if request.temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        seed = request.seed if request.seed is not None else random.getrandbits(31)
        if request.top_p < 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(request.top_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(request.temperature))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n

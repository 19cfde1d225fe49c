"""The llama.cpp engine: continuous batching of up to `slots` sequences in one context.

Every `step()` makes one `llama_decode` call holding the next token of every generating sequence
plus as much of newly admitted prompts as the batch allows, then samples one token for each
sequence whose logits it computed. Each slot keeps the tokens in its KV cache, so a request whose
prompt extends an earlier one (the next turn of a chat) re-evaluates only the new part.

With speculative decoding (a draft model, or prompt lookup), a greedy sequence feeds its next
token plus the drafted ones in the same decode, with logits for each; the drafts are accepted
while they equal the target's argmax, and the target's own token at the first mismatch (or after
the last draft) comes free. Rejected drafts leave the KV cache at once.
Runs inside the engine child process only; every call blocks.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import zmq

from actors._errors import ContextOverflow, EngineFailed, InvalidRequest
from actors.engine._batching import DecodePlanner
from actors.engine._drafter import DraftClient, DraftModel, SpeculativeDrafter, draft_threads
from actors.engine._engine import EngineEvent, check_context, closing_events, render_chat
from actors.engine._llamacpp import (
    add_token,
    logits_reader,
    model_devices,
    open_context,
    rpc_load_stats,
    split_devices,
    vocabulary_mismatch,
)
from actors.engine._speculative import DraftLength, Governor, NgramIndex
from actors.engine._textstream import TextStream
from actors.engine._tools import call_grammar, grammar_schema, knows_tools, template_messages, tool_syntax
from actors.gguf._identity import SOURCE_MODEL_ID_KEY, model_id_of
from actors.wire._messages import Chunk, ErrorReply, Finished, Generate, Started, TokenLogprob, TopLogprob

log = logging.getLogger(__name__)

DRAFTERS = ("draft", "lookup")
GRAMMAR_SHORTLISTS = (256, 4096)  # likeliest tokens checked against a grammar before all of them
EMBED_BATCH = 64  # tokens per decode when embedding (each one an output row)
PENALTY_WINDOW = 64  # tokens the repetition penalties look back over (llama.cpp's default)
# New prompts share a step while their tokens together stay within this; a longer one goes alone.
# Measured on 2 cores (300M Q8_0): four 30-token prompts took 336 ms in one decode, 355 in two,
# 388 in four; one each step gives the earliest first tokens, two cost far less than four.
SHARED_PREFILL_TOKENS = 64


@dataclass(slots=True)
class _Feed:
    """What a step feeds one sequence: `tokens` (the first `n_take` from its todo, then drafts)
    from position `at`; `whole`: its todo is all fed, so it samples after them."""

    slot: _Slot
    at: int
    tokens: list[int]
    n_take: int
    whole: bool


@dataclass(slots=True)
class _Slot:
    """One sequence id of the context, and what its KV cache holds."""

    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV entries are present
    request: Generate | None = None
    admitted: int = 0  # the request's place in the order of admission
    todo: list[int] = field(default_factory=list)  # tokens to feed before the next sample
    # A resumed request's tokens from this position on were generated (elsewhere): they are fed
    # one per step, as they were when generated, so that the KV cache holds bit for bit the
    # values it held there (a batch rounds differently) and greedy decoding goes on identically.
    replay_from: int | None = None
    max_tokens: int = 0
    n_done: int = 0
    unsent: list[int] = field(default_factory=list)  # generated ids whose text is not sent yet
    fresh_logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens just sampled
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)  # of the `unsent` tokens
    n_prompt: int = 0
    sampler: Any = None  # llama.cpp's sampler chain for the request, without its grammar
    argmax: bool = False  # the chain is the greedy sampler alone: take the likeliest token ourselves
    grammar: Any = None  # the grammar sampler of a structured request (see `_constrained`)
    stream: TextStream | None = None
    drafter: str = ""  # "draft", "lookup" or "" (this request decodes plainly)
    draft_len: DraftLength = field(default_factory=DraftLength)
    n_drafted: int = 0
    n_accepted: int = 0
    lookup: NgramIndex | None = None  # the request's text so far, for prompt lookup
    mirror: list[int] = field(default_factory=list)  # what the draft model's cache holds
    mirror_ok: int = 0  # a prefix of `mirror` known to equal `cached + todo`

    @property
    def replaying(self) -> bool:
        """Feeding a resumed request's generated tokens: one per step."""
        return self.replay_from is not None and len(self.cached) >= self.replay_from


class LlamaEngine:
    """A GGUF model in llama.cpp serving `slots` sequences at once."""

    def __init__(
        self,
        path: str,
        *,
        n_ctx: int,
        n_threads: int,
        slots: int = 1,
        n_batch: int = 512,
        draft: str | None = None,
        speculative: str = "",
        governor: Governor | None = None,
        devices: list[str] | None = None,
        tensor_split: list[int] | None = None,
        device_files: list[str] | None = None,
    ) -> None:
        """`draft`: a draft GGUF for the speculative-drafter actor; `speculative`: the drafter a
        request gets by default ("draft", "lookup" or "" for none); `governor`: decides whether
        drafting pays (by default, by measuring it); `devices` and `tensor_split`: a dense split's
        members in layer order ("cpu" or an RPC endpoint) and the layers each holds; `device_files`:
        for each, the identity of the GGUF it loads its tensors from itself ("" to be sent them)."""
        import llama_cpp  # imported here: only engine children pay for loading llama.cpp

        self._lib = lib = llama_cpp
        # The Llama object owns the model, tokenizer and metadata; its own context stays tiny.
        if devices:
            with model_devices(llama_cpp, split_devices(llama_cpp, devices, device_files)):
                self.llm = llama_cpp.Llama(
                    model_path=path,
                    n_ctx=64,
                    n_batch=64,
                    n_threads=n_threads,
                    n_gpu_layers=-1,
                    tensor_split=[float(n) for n in tensor_split or []],
                    verbose=False,
                )
            _log_split_load(llama_cpp, devices)
        else:
            self.llm = llama_cpp.Llama(
                model_path=path, n_ctx=64, n_batch=64, n_threads=n_threads, n_gpu_layers=0, verbose=False
            )
        meta: dict[str, str] = self.llm.metadata
        self.model_id = meta.get(SOURCE_MODEL_ID_KEY) or model_id_of(path)
        self.n_ctx = n_ctx
        self.slots = slots
        self.n_params = int(lib.llama_model_n_params(self.llm.model))
        self._template = meta.get("tokenizer.chat_template")
        self.tool_syntax = tool_syntax(self._template)
        self._vocab = lib.llama_model_get_vocab(self.llm.model)
        self._bos = self._special_piece(self.llm.token_bos())
        self._eos = self._special_piece(self.llm.token_eos())
        self._n_vocab = self.llm.n_vocab()
        self._ctx, self._memory, self._batch = open_context(
            lib, self.llm.model, n_ctx=n_ctx, slots=slots, n_batch=n_batch, n_threads=n_threads
        )
        self._n_batch = n_batch
        self._logits = logits_reader(lib, self._n_vocab)
        self._pieces: dict[int, tuple[bytes, bool]] = {}  # token id -> (text, ends generation)
        self._slots = [_Slot(seq_id=i) for i in range(slots)]
        self._admissions = itertools.count()
        self._drafts: Any = None  # a DraftClient when a draft model runs next to us
        self._drafter_actor: Any = None
        if draft:
            self._start_drafter(draft, n_threads)
        if speculative and speculative not in DRAFTERS:
            raise ValueError(f"unknown speculative mode {speculative!r}")
        if speculative == "draft" and not draft:
            raise ValueError("speculative mode 'draft' needs a draft model")
        self.speculative = speculative
        self.governor = governor or Governor()
        self.planner = DecodePlanner()  # how generating sequences split into decodes, measured
        self._fed_prompts = False  # the last step fed prompts: the next one feeds generating sequences
        self.drafted = self.accepted = 0

    def _start_drafter(self, path: str, n_threads: int) -> None:
        model = DraftModel(path, n_ctx=self.n_ctx, n_threads=draft_threads(n_threads), slots=self.slots)
        mismatch = vocabulary_mismatch(self.llm, model.llm)
        if mismatch:
            raise ValueError(f"the draft model {path} cannot draft for this model: {mismatch}")
        self._zmq = zmq.Context()
        endpoint = "inproc://speculative-drafter"
        self._drafter_actor = SpeculativeDrafter(self._zmq, model, endpoint).start()
        self._drafts = DraftClient(self._zmq, endpoint)

    def close(self) -> None:
        """Stop the drafter actor (the engine itself lives as long as its process)."""
        if self._drafts is not None:
            self._drafts.close()
            self._drafter_actor.stop()
            self._zmq.term()
            self._drafts = None

    def unload(self) -> None:
        """Free the context and the model now (an engine child just exits instead). A split's
        model must be freed while its stages still answer: llama.cpp aborts otherwise."""
        self.close()
        self._lib.llama_batch_free(self._batch)
        self._lib.llama_free(self._ctx)
        self.llm.close()

    def stats(self) -> dict[str, object]:
        rate = self.accepted / self.drafted if self.drafted else None
        return {
            "default": self.speculative or "off",
            "drafted_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "acceptance_rate": round(rate, 4) if rate is not None else None,
            **self.governor.snapshot(),
        }

    def _special_piece(self, token: int) -> str:
        """A control token's own text (its BOS or EOS, for chat templates); "" if it has none."""
        if token < 0:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    @property
    def active(self) -> int:
        return len(self._active())

    def _active(self) -> list[_Slot]:
        return [s for s in self._slots if s.request is not None]

    def render(self, request: Generate) -> str:
        """The prompt text: the request's prompt, or its messages through the chat template."""
        if request.prompt is not None:
            return request.prompt
        if not self._template:
            raise InvalidRequest("this model has no chat template; use /v1/completions", param="messages")
        native = knows_tools(self._template)
        messages = request.messages or []
        if request.tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
            messages = template_messages(messages, request.tools, native)
        tools = request.tools if native and request.tools else None
        return render_chat(self._template, messages, self._bos, self._eos, tools)

    @functools.cached_property
    def _max_piece_bytes(self) -> int:
        """The longest token in bytes: a text longer than n_ctx of them cannot fit, and is refused
        without being tokenized. Found when a text is first longer than n_ctx bytes, not at
        start-up, where it took ~0.05 s of the engine's ~0.45 s for a 32k vocabulary."""
        return max(len(self.llm.detokenize([t], special=True)) for t in range(self._n_vocab))

    def admit(self, request: Generate) -> list[EngineEvent]:
        """Take a request into a free slot; raises `RequestError` if it cannot be served."""
        text = self.render(request).encode("utf-8")
        if len(text) > self.n_ctx and len(text) > self.n_ctx * self._max_piece_bytes:
            # More bytes than n_ctx of our longest tokens can spell: no need to tokenize it all
            # (a 4 MiB prompt would cost seconds of this engine's time before its 400).
            raise ContextOverflow(
                f"This model's maximum context length is {self.n_ctx} tokens; the prompt of "
                f"{len(text)} bytes is longer than that whatever its tokens.",
                n_ctx=self.n_ctx,
            )
        tokens = self.llm.tokenize(text, add_bos=True, special=True) + list(request.resume_tokens)
        if not tokens:
            raise InvalidRequest(
                "The prompt is empty, and this model's tokenizer adds no BOS token: there is nothing "
                "to generate from.",
                param="prompt" if request.prompt is not None else "messages",
            )
        free = [s for s in self._slots if s.request is None]
        if request.embed:
            check_context(self.n_ctx, len(tokens), 1)
            if not free:
                raise InvalidRequest(f"all {self.slots} slots are busy")
            return self._embed(request, tokens, free[0])
        max_tokens = check_context(self.n_ctx, len(tokens), request.max_tokens)
        if not free:
            raise InvalidRequest(f"all {self.slots} slots are busy")
        drafter = self._drafter_for(request)  # these two may refuse the request: before the slot changes
        sampler, grammar, greedy_alone = self._sampler(request, tokens)
        slot = max(free, key=lambda s: _common_prefix(s.cached, tokens))
        keep = min(_common_prefix(slot.cached, tokens), len(tokens) - 1)  # re-feed >= 1 token
        if keep < 2:
            # Reusing a BOS alone saves nothing, and a prompt evaluated whole is one a failover
            # can evaluate again the same way (a resumed greedy stream then goes on identically).
            keep = 0
        if request.seed is not None and request.temperature > 0:
            # A seeded sample is reproducible only if its logits are: evaluate the whole prompt
            # in the same batches every time (a cached prefix changes the batch shapes, and with
            # them llama.cpp's float rounding).
            keep = 0
        self._lib.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1)
        slot.cached = tokens[:keep]
        slot.todo = tokens[keep:]
        slot.request = request
        slot.admitted = next(self._admissions)
        slot.max_tokens = max_tokens
        slot.n_done = 0
        slot.unsent = []
        slot.fresh_logprobs, slot.unsent_logprobs = [], []
        slot.replay_from = len(tokens) - len(request.resume_tokens) if request.resume_tokens else None
        slot.n_prompt = len(tokens)
        slot.sampler, slot.grammar = sampler, grammar
        # Logprobs and resumed requests keep llama.cpp's own path.
        slot.argmax = greedy_alone and request.logprobs < 0 and not request.resume_tokens
        slot.stream = TextStream(request.stop)
        slot.drafter = drafter
        slot.n_drafted = slot.n_accepted = 0
        slot.draft_len = DraftLength()
        slot.lookup = NgramIndex(tokens) if slot.drafter == "lookup" else None
        slot.mirror_ok = 0
        syntax = self.tool_syntax if request.tools else ""
        return [Started(request_id=request.request_id, prompt_tokens=len(tokens), tool_syntax=syntax)]

    def _embed(self, request: Generate, tokens: list[int], slot: _Slot) -> list[EngineEvent]:
        """The prompt's embedding, at once: the model's last hidden states, mean-pooled over its
        tokens and L2-normalized. The slot's sequence is used and left empty."""
        lib, batch, seq = self._lib, self._batch, slot.seq_id
        lib.llama_memory_seq_rm(self._memory, seq, 0, -1)
        slot.cached = []
        n_embd = lib.llama_model_n_embd(self.llm.model)
        total = np.zeros(n_embd, dtype=np.float64)
        lib.llama_set_embeddings(self._ctx, True)
        try:
            for start in range(0, len(tokens), EMBED_BATCH):  # a few rows of outputs at a time
                part = tokens[start : start + EMBED_BATCH]
                batch.n_tokens = 0
                for i, token in enumerate(part):
                    add_token(batch, token, start + i, seq, True)
                if lib.llama_decode(self._ctx, batch) != 0:
                    raise EngineFailed("llama_decode failed while embedding")
                for i in range(len(part)):
                    total += np.ctypeslib.as_array(
                        lib.llama_get_embeddings_ith(self._ctx, i), shape=(n_embd,)
                    )
        finally:
            lib.llama_set_embeddings(self._ctx, False)
            lib.llama_memory_seq_rm(self._memory, seq, 0, -1)
        norm = float(np.linalg.norm(total))
        vector = (total / norm if norm > 0 else total).tolist()
        rid = request.request_id
        return [
            Started(request_id=rid, prompt_tokens=len(tokens)),
            Finished(
                request_id=rid,
                finish_reason="stop",
                prompt_tokens=len(tokens),
                completion_tokens=0,
                embedding=vector,
            ),
        ]

    def _drafter_for(self, request: Generate) -> str:
        """The drafter a request gets: its own choice, else the node's; only greedy requests
        draft (acceptance by argmax keeps their output exactly that of plain decoding)."""
        choice = request.speculative or self.speculative
        if choice == "off" or request.temperature > 0:
            return ""
        if choice == "draft" and self._drafts is None:
            raise InvalidRequest(
                "this node runs no draft model (mesh-llm serve --draft)", param="speculative"
            )
        if choice not in ("", *DRAFTERS):
            raise InvalidRequest(
                f"speculative must be off, lookup or draft, not {choice!r}", param="speculative"
            )
        return choice

    def cancel(self, request_id: str) -> bool:
        """Drop a request; True if this engine held it."""
        for slot in self._slots:
            if slot.request is not None and slot.request.request_id == request_id:
                self._release(slot)
                return True
        return False

    def step(self) -> list[EngineEvent]:
        """One step: a decode of the generating sequences (with drafted tokens, where drafting
        pays; split into several decodes where the planner measured that cheaper), or of waiting
        prompts; the events it produced."""
        started = time.perf_counter()
        budget = self._n_batch
        prompt_tokens = 0  # fed in this step
        feeding, prompt_turn = self._feeding()
        drafts = {} if prompt_turn else self._plan_drafts()
        fed: list[_Feed] = []
        for slot in feeding:
            limit, at = budget, len(slot.cached)
            if slot.replaying:
                limit = 1
            elif slot.replay_from is not None:  # the prompt before the replayed tokens
                limit = min(budget, slot.replay_from - at)
            take = slot.todo[:limit]
            if not take:
                continue
            if len(take) > 1 and prompt_tokens and prompt_tokens + len(take) > SHARED_PREFILL_TOKENS:
                break  # it and the prompts after it wait for the next prompt turn
            prompt_tokens += len(take) if len(take) > 1 else 0
            whole = len(take) == len(slot.todo)  # its last token is fed: sample after it
            extra = drafts.get(slot.seq_id, [])[: budget - len(take)] if whole else []
            fed.append(_Feed(slot, at, take + extra, len(take), whole))
            slot.cached += take + extra
            slot.todo = slot.todo[len(take) :]
            budget -= len(take) + len(extra)
            if budget <= 0:
                break
        sampled = [f.slot for f in fed if f.whole]
        events: list[EngineEvent] = self._end_stalled(sampled)
        if not fed:
            return events
        one_each = all(f.n_take == 1 for f in fed)  # generating sequences (with drafts, maybe)
        decoding_only = one_each and all(len(f.tokens) == 1 for f in fed)  # and no drafts
        emitted = 0
        sizes = self.planner.plan(len(fed)) if decoding_only else [len(fed)]
        rest = fed
        for size in sizes:
            group, rest = rest[:size], rest[size:]
            emits, seconds = self._decode(group)
            if decoding_only:
                self.planner.record(size, seconds)
            for slot, tokens in emits:
                emitted += len(tokens)
                events += self._advance(slot, tokens)
        if one_each and any(slot.drafter for slot in sampled):
            self.governor.record(emitted, time.perf_counter() - started, len(sampled))
        return events

    def _decode(self, group: list[_Feed]) -> tuple[list[tuple[_Slot, list[int]]], float]:
        """Decode what `group` feeds in one llama.cpp batch; each sequence fed whole with the
        tokens it now emits, and the seconds llama.cpp took."""
        batch = self._batch
        batch.n_tokens = 0
        for feed in group:
            for i, token in enumerate(feed.tokens):
                add_token(batch, token, feed.at + i, feed.slot.seq_id, feed.whole and i >= feed.n_take - 1)
        began = time.perf_counter()
        if self._lib.llama_decode(self._ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        seconds = time.perf_counter() - began
        out, index = [], 0
        for feed in group:
            index += len(feed.tokens)
            if feed.whole:
                extra = feed.tokens[feed.n_take :]
                out.append((feed.slot, self._verify(feed.slot, index - 1 - len(extra), extra)))
        return out, seconds

    def _feeding(self) -> tuple[list[_Slot], bool]:
        """The sequences this step feeds, and whether they are prompts: those generating (a token
        each, plus drafts) or, every other step while any wait, prompts (in order of arrival: the
        first, and the next ones only while they fit in SHARED_PREFILL_TOKENS); never both. With
        one KV stream per sequence, llama.cpp decodes a mixed step as two batches anyway (the
        prompt; the generating sequences but the one prefilling, three of four), and on a CPU a
        decode of three tokens can cost more than one of four (300M Q8_0, 2 cores: 40 ms against
        33). Taking turns keeps the generating batch whole: their next tokens come as soon (after
        the prefill, in one decode with the new sequence), and prompts that arrive together get
        their first tokens a prefill or two apart, not all after the prefill of them all.
        Measured in-process, 4 clients back to back (300M Q8_0): time to first token p50 178 ms
        against 223 mixed, aggregate +1 %."""
        generating, prompts = [], []
        for slot in self._active():
            if len(slot.todo) == 1 or slot.replaying:
                generating.append(slot)
            elif slot.todo:
                prompts.append(slot)
        prompt_turn = bool(prompts) and not (generating and self._fed_prompts)
        self._fed_prompts = prompt_turn
        if prompt_turn:
            return sorted(prompts, key=lambda s: s.admitted), True
        # In sequence order (measured: 4 sequences' step took 20 ms, not 13, with their KV
        # streams out of order).
        return sorted(generating, key=lambda s: s.seq_id), False

    def _end_stalled(self, sampled: list[_Slot]) -> list[EngineEvent]:
        """End, with an error, any request this step neither fed nor sampled: it could never
        produce a token and would hold its slot forever. (Admission refuses the known cases;
        this keeps the promise that every admitted request ends.)"""
        fed = {slot.seq_id for slot in sampled}
        events: list[EngineEvent] = []
        for slot in self._slots:
            if slot.request is not None and not slot.todo and slot.seq_id not in fed:
                events.append(
                    ErrorReply(
                        request_id=slot.request.request_id,
                        code=EngineFailed.code,
                        message="the engine could not make progress on this request",
                    )
                )
                self._release(slot)
        return events

    def _plan_drafts(self) -> dict[int, list[int]]:
        """Drafted tokens for each greedy generating sequence, if drafting pays now."""
        if not self.governor.drafting:
            return {}
        ready = [
            s for s in self._slots if s.request is not None and s.drafter and len(s.todo) == 1 and s.n_done
        ]
        out: dict[int, list[int]] = {}
        asked: list[tuple[_Slot, int, list[int], int]] = []  # slot, keep, append, how many
        for slot in ready:
            # Never past max_tokens (the last token comes free) or the context.
            k = min(slot.draft_len.k, slot.max_tokens - slot.n_done - 1, self.n_ctx - len(slot.cached) - 2)
            if k <= 0:
                continue
            if slot.drafter == "lookup":
                assert slot.lookup is not None
                out[slot.seq_id] = slot.lookup.propose(k)
            else:  # the draft model keeps what it shares with us and is fed the rest (todo: 1 token)
                keep = _common_prefix(slot.mirror, slot.cached, slot.mirror_ok)
                asked.append((slot, keep, slot.cached[keep:] + slot.todo, k))
        if asked:
            replies = self._drafts.draft([[s.seq_id, keep, append, k] for s, keep, append, k in asked])
            for slot, keep, append, _k in asked:
                if slot.seq_id in replies:
                    tokens, held = replies[slot.seq_id]
                    # Mirror what the draft model now holds, changing only the tail.
                    del slot.mirror[keep:]
                    slot.mirror += append + tokens
                    del slot.mirror[held:]
                    slot.mirror_ok = keep + len(append)
                    out[slot.seq_id] = tokens
        return {seq: tokens for seq, tokens in out.items() if tokens}

    def _verify(self, slot: _Slot, index: int, drafts: list[int]) -> list[int]:
        """The tokens a sequence emits from this step: the drafts the target agrees with, then
        the target's own next token. Rejected drafts are removed from the KV cache."""
        out = []
        top_k = slot.request.logprobs if slot.request is not None else -1
        for i in range(len(drafts) + 1):
            if slot.argmax:
                token = self._argmax(index + i)
            elif slot.grammar is None:
                token = int(self._lib.llama_sampler_sample(slot.sampler, self._ctx, index + i))
            else:
                token = self._constrained(slot, index + i)
            out.append(token)
            if top_k >= 0:
                slot.fresh_logprobs.append(self._logprob(index + i, token, top_k))
            if i == len(drafts) or token != drafts[i]:
                break
        if drafts:
            accepted = len(out) - 1
            slot.n_drafted += len(drafts)
            slot.n_accepted += accepted
            self.drafted += len(drafts)
            self.accepted += accepted
            slot.draft_len.update(len(drafts), accepted)
            rejected = len(drafts) - accepted
            if rejected:
                del slot.cached[-rejected:]
                self._lib.llama_memory_seq_rm(self._memory, slot.seq_id, len(slot.cached), -1)
        return out

    def _advance(self, slot: _Slot, tokens: list[int]) -> list[EngineEvent]:
        """Account for sampled tokens (all but the last are already in the KV cache): emit their
        text, and finish the request if it is done."""
        assert slot.request is not None and slot.stream is not None
        events: list[EngineEvent] = []
        for i, token in enumerate(tokens):
            piece, end = self._piece_and_end(token)
            if end:
                return events + self._finish(slot, "stop")
            slot.n_done += 1
            slot.unsent.append(token)
            if slot.fresh_logprobs:
                slot.unsent_logprobs.append(slot.fresh_logprobs[i])
            if slot.lookup is not None:
                slot.lookup.add(token)
            text, stopped = slot.stream.feed(piece)
            if text:
                rid, sent = slot.request.request_id, slot.unsent
                events.append(
                    Chunk(
                        request_id=rid,
                        text=text,
                        n_tokens=len(sent),
                        tokens=sent,
                        logprobs=slot.unsent_logprobs,
                    )
                )
                slot.unsent, slot.unsent_logprobs = [], []
            if stopped:
                return events + self._finish(slot, "stop")
            if slot.n_done >= slot.max_tokens:
                return events + self._finish(slot, "length")
        slot.todo = [tokens[-1]]
        slot.fresh_logprobs = []
        return events

    def _piece_and_end(self, token: int) -> tuple[bytes, bool]:
        """A generated token's text and whether it ends generation, asked of llama.cpp once
        per token id (at most the vocabulary): after each decode has swept the CPU's caches, the
        two calls through llama-cpp-python took ~20 us a token more than this lookup (100M
        model, 5 ms a token)."""
        known = self._pieces.get(token)
        if known is None:
            known = self._pieces[token] = (
                self.llm.detokenize([token]),
                bool(self._lib.llama_vocab_is_eog(self._vocab, token)),
            )
        return known

    def _argmax(self, index: int) -> int:
        """The likeliest token at batch `index`: what a chain of the greedy sampler alone draws
        (the first of equal logits too), for a tenth of its cost (it copies the vocabulary)."""
        return int(self._logits(self._ctx, index).argmax())

    def _logprob(self, index: int, token: int, top_k: int) -> TokenLogprob:
        """The log probability of `token` under the logits at batch `index` (the model's, before
        sampling), and the `top_k` likeliest tokens there."""
        n_vocab = self._n_vocab
        logits = self._logits(self._ctx, index).astype(np.float64)
        peak = logits.max()
        logprobs = logits - (peak + np.log(np.exp(logits - peak).sum()))
        top = np.argpartition(-logprobs, top_k)[:top_k] if 0 < top_k < n_vocab else np.arange(n_vocab)[:top_k]
        top = top[np.argsort(-logprobs[top], kind="stable")]
        return TokenLogprob(
            piece=self._piece_and_end(token)[0],
            logprob=max(float(logprobs[token]), -9999.0),
            top=[
                TopLogprob(piece=self._piece_and_end(int(t))[0], logprob=max(float(logprobs[t]), -9999.0))
                for t in top
            ],
        )

    def _finish(self, slot: _Slot, reason: str) -> list[EngineEvent]:
        request, stream = slot.request, slot.stream
        assert request is not None and stream is not None
        events = closing_events(
            request.request_id, stream, slot.unsent, reason, slot.n_prompt, slot.n_done, slot.unsent_logprobs
        )
        if slot.drafter:
            done = events[-1]
            assert isinstance(done, Finished)
            events[-1] = replace(
                done, drafter=slot.drafter, drafted_tokens=slot.n_drafted, accepted_tokens=slot.n_accepted
            )
        self._release(slot)
        return events

    def _release(self, slot: _Slot) -> None:
        for sampler in (slot.sampler, slot.grammar):
            if sampler is not None:
                self._lib.llama_sampler_free(sampler)
        slot.request = slot.sampler = slot.grammar = slot.stream = slot.lookup = None
        # Fed-but-unsampled tokens are in the cache; tokens still to feed are not.
        slot.todo = []

    def _sampler(self, request: Generate, context: list[int]) -> tuple[Any, Any, bool]:
        """llama.cpp's sampler chain for a request: logit bias, penalties (over the last
        `PENALTY_WINDOW` tokens of `context` and of what it generates), then greedy, or top-k,
        top-p, min-p, temperature and a seeded draw; and apart from it, the grammar of a forced
        tool call or structured output (or None). A resumed request's tokens (the end of
        `context`) go through both as if just generated. Raises `InvalidRequest` for what cannot
        be honoured (a bias on a token the model lacks, a schema with no grammar). Third: whether
        that is the greedy sampler alone, with no grammar (`_argmax` then draws the same)."""
        lib = self._lib
        n_vocab = self._n_vocab
        bias = self._logit_bias(request.logit_bias, n_vocab)
        grammar = self._grammar(request)
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        add = lambda s: lib.llama_sampler_chain_add(chain, s)  # noqa: E731
        if bias:
            array = (lib.llama_logit_bias * len(bias))(*(lib.llama_logit_bias(t, b) for t, b in bias))
            add(lib.llama_sampler_init_logit_bias(n_vocab, len(bias), array))
        resumed = len(request.resume_tokens)
        penalties = (request.repeat_penalty, request.frequency_penalty, request.presence_penalty)
        if penalties != (1.0, 0.0, 0.0):
            penalty = lib.llama_sampler_init_penalties(n_vocab, PENALTY_WINDOW, *penalties)
            for token in context[: len(context) - resumed][-PENALTY_WINDOW:]:  # the prompt counts too
                lib.llama_sampler_accept(penalty, token)
            add(penalty)
        if request.temperature <= 0:
            add(lib.llama_sampler_init_greedy())
        else:
            self._add_random(request, add)
        for token in context[len(context) - resumed :]:  # generated before a failover
            lib.llama_sampler_accept(chain, token)
            if grammar is not None:
                lib.llama_sampler_accept(grammar, token)
        greedy_alone = not bias and penalties == (1.0, 0.0, 0.0) and request.temperature <= 0
        return chain, grammar, greedy_alone and grammar is None

    def _constrained(self, slot: _Slot, index: int) -> int:
        """Sample under a grammar without checking the whole vocabulary against it each token
        (llama.cpp's grammar sampler costs ~6 ms a token on a 32k vocabulary): draw as if free,
        keep the token if the grammar takes it (as a trained model's usually is); else, for
        greedy requests, the best token the grammar takes among the likeliest (`GRAMMAR_SHORTLISTS`:
        the same token a full check finds, when it is there), and only then the full check.
        Sampled requests redraw from the grammar's share of the distribution."""
        lib, n_vocab = self._lib, self._n_vocab
        logits = self._logits(self._ctx, index)
        candidates = _candidates(logits)
        token = _apply(lib, slot.sampler, candidates)
        greedy = slot.request is not None and slot.request.temperature <= 0
        if not self._grammar_takes(slot.grammar, token):
            if greedy:  # the chain kept every candidate in place, with bias and penalties applied
                for size in (*GRAMMAR_SHORTLISTS, n_vocab):
                    if size < n_vocab:  # the `size` likeliest (the best the grammar takes, if it is there)
                        shortlist = candidates[np.argpartition(-candidates["logit"], size)[:size]]
                    else:
                        shortlist = candidates
                    _apply(lib, slot.grammar, shortlist, select=False)
                    if np.isfinite(shortlist["logit"]).any():
                        break
                token = int(shortlist["id"][np.argmax(shortlist["logit"])])
            else:
                candidates = _candidates(logits)
                _apply(lib, slot.grammar, candidates, select=False)
                token = _apply(lib, slot.sampler, candidates)
        lib.llama_sampler_accept(slot.grammar, token)
        lib.llama_sampler_accept(slot.sampler, token)
        return token

    def _grammar_takes(self, grammar: Any, token: int) -> bool:
        probe = np.array([(token, 0.0, 0.0)], dtype=TOKEN_DATA)
        _apply(self._lib, grammar, probe, select=False)
        return bool(np.isfinite(probe["logit"][0]))

    def _grammar(self, request: Generate) -> Any:
        """A grammar sampler for a forced tool call or structured output, or None for free text."""
        response_format = request.response_format
        kind = response_format.get("type", "text")
        forced = request.tools and (
            request.tool_choice == "required" or request.tool_choice.startswith("function:")
        )
        if not forced and kind == "text":
            return None
        from llama_cpp import llama_grammar

        if forced:
            text = call_grammar(self.tool_syntax, request.tools, request.tool_choice)
        elif kind == "json_object":
            text = llama_grammar.JSON_GBNF
        elif kind == "json_schema":
            try:
                schema = grammar_schema(response_format.get("schema", {}))
                text = llama_grammar.json_schema_to_gbnf(json.dumps(schema))
            except Exception as err:  # the converter raises what it likes on schemas it cannot do
                raise InvalidRequest(
                    f"response_format: this JSON schema has no grammar: {err}", param="response_format"
                ) from err
        else:
            raise InvalidRequest(f"response_format type {kind!r} is not supported", param="response_format")
        grammar = self._lib.llama_sampler_init_grammar(self._vocab, text.encode(), b"root")
        if not grammar:
            raise InvalidRequest(
                "response_format: llama.cpp could not parse the grammar", param="response_format"
            )
        return grammar

    def _add_random(self, request: Generate, add: Any) -> None:
        lib = self._lib
        seed = request.seed if request.seed is not None else random.getrandbits(31)
        if request.top_k > 0:
            add(lib.llama_sampler_init_top_k(request.top_k))
        if request.top_p < 1.0:
            add(lib.llama_sampler_init_top_p(request.top_p, 1))
        if request.min_p > 0.0:
            add(lib.llama_sampler_init_min_p(request.min_p, 1))
        add(lib.llama_sampler_init_temp(request.temperature))
        add(lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    @staticmethod
    def _logit_bias(bias: dict[str, float], n_vocab: int) -> list[tuple[int, float]]:
        out = []
        for key, value in bias.items():
            token = int(key) if key.isdigit() else -1
            if not 0 <= token < n_vocab:
                raise InvalidRequest(
                    f"logit_bias: {key!r} is not a token id of this model (0..{n_vocab - 1})",
                    param="logit_bias",
                )
            out.append((token, float(value)))
        return out


TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data


def _candidates(logits: np.ndarray) -> np.ndarray:
    """Every token with its logit, as llama.cpp's samplers take them."""
    out = np.empty(len(logits), dtype=TOKEN_DATA)
    out["id"] = np.arange(len(logits), dtype=np.int32)
    out["logit"] = logits
    out["p"] = 0.0
    return out


def _apply(lib: Any, sampler: Any, candidates: np.ndarray, select: bool = True) -> int:
    """Run a llama.cpp sampler over `candidates` in place; the index it selected (if `select`)."""
    import ctypes

    array = lib.llama_token_data_array(
        data=candidates.ctypes.data_as(lib.llama_token_data_p),
        size=len(candidates),
        selected=-1,
        sorted=False,
    )
    lib.llama_sampler_apply(sampler, ctypes.byref(array))
    if not select:
        return -1
    if not 0 <= array.selected < array.size:
        raise EngineFailed("the sampler selected no token")
    return int(array.data[array.selected].id)  # samplers may reorder the array: ask it


def _common_prefix(a: list[int], b: list[int], start: int = 0) -> int:
    """The length of the common prefix of `a` and `b`, known to be at least `start`."""
    n = min(start, len(a), len(b))
    for x, y in zip(a[n:], b[n:], strict=False):
        if x != y:
            break
        n += 1
    return n


def _log_split_load(llama_cpp: Any, devices: list[str]) -> None:
    """Say how each RPC stage got its weights: read from its own file, or sent."""
    for endpoint in devices:
        if endpoint != "cpu":
            n_file, bytes_file, n_sent, bytes_sent = rpc_load_stats(llama_cpp, endpoint)
            log.info(
                "stage %s: %d tensors (%.1f MB) read from its own file, %d tensors (%.1f MB) sent",
                endpoint, n_file, bytes_file / 1e6, n_sent, bytes_sent / 1e6,
            )  # fmt: skip

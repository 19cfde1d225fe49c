"""The one leaf module of raw llama.cpp calls shared by the engine and the drafter: contexts,
batches, vocabulary checks. Imports nothing of ours; llama.cpp itself is passed in (`lib`)."""

from __future__ import annotations

from typing import Any


def open_context(lib: Any, model: Any, *, n_ctx: int, slots: int, n_batch: int, n_threads: int) -> Any:
    """A llama.cpp context with `slots` sequences of `n_ctx` tokens each; (ctx, memory, batch)."""
    params = lib.llama_context_default_params()
    params.n_ctx = n_ctx * slots
    params.n_seq_max = slots
    params.kv_unified = False  # each sequence gets a full n_ctx of its own
    params.n_batch = params.n_ubatch = n_batch
    params.n_threads = params.n_threads_batch = n_threads
    ctx = lib.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} x {slots} tokens")
    return ctx, lib.llama_get_memory(ctx), lib.llama_batch_init(n_batch, 0, 1)


def add_token(batch: Any, token: int, pos: int, seq_id: int, logits: bool) -> None:
    """Append one token of one sequence to a llama.cpp batch."""
    i = batch.n_tokens
    batch.token[i] = token
    batch.pos[i] = pos
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq_id
    batch.logits[i] = logits
    batch.n_tokens = i + 1


def vocabulary_mismatch(target: Any, draft: Any) -> str:
    """Why a draft model's tokens cannot stand for the target's ("" if they can)."""
    n_target, n_draft = target.n_vocab(), draft.n_vocab()
    if n_target != n_draft:
        return f"its vocabulary has {n_draft} tokens, the target's {n_target}"
    for token in range(n_target):
        a = target.detokenize([token], special=True)
        b = draft.detokenize([token], special=True)
        if a != b:
            return f"token {token} is {b!r} in the draft model but {a!r} in the target"
    return ""

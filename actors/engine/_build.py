"""Building the engine a child process serves from its spec (llama.cpp, or the fake)."""

from __future__ import annotations

from actors.engine._engine import Engine
from actors.engine._fake import FakeEngine
from actors.engine._llama import LlamaEngine


def load_engine(
    model: str, *, n_ctx: int, n_threads: int, slots: int, draft: str | None = None, speculative: str = ""
) -> Engine:
    """The engine for a model spec: a GGUF path, or `fake:...` for tests; `draft` and
    `speculative` set up speculative decoding (llama.cpp engines only)."""
    if model.startswith("fake:"):
        return FakeEngine(model)
    return LlamaEngine(
        model, n_ctx=n_ctx, n_threads=n_threads, slots=slots, draft=draft, speculative=speculative
    )

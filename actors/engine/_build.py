"""Building the engine a child process serves from its spec (llama.cpp, or the fake)."""

from __future__ import annotations

from actors.engine._engine import Engine
from actors.engine._fake import FakeEngine
from actors.engine._llama import LlamaEngine
from actors.wire._messages import EngineSpec


def load_engine(spec: EngineSpec) -> Engine:
    """The engine a spec describes: llama.cpp for a GGUF path, the fake for `fake:...`."""
    if spec.model.startswith("fake:"):
        return FakeEngine(spec.model)
    return LlamaEngine(
        spec.model,
        n_ctx=spec.n_ctx,
        n_threads=spec.n_threads,
        slots=spec.slots,
        draft=spec.draft,
        speculative=spec.speculative,
        devices=spec.devices,
        tensor_split=spec.tensor_split,
        device_files=spec.device_files,
    )

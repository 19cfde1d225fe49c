"""What runs only inside engine child processes, and may block.

- `_child`        the child's main: receives its spec, builds the engine, serves the worker.
- `_build`        `load_engine(spec)`: llama.cpp or the fake.
- `_engine`       the `Engine` protocol and rules every engine shares (budget, chat, closing).
- `_llama`        `LlamaEngine`: continuous batching over llama.cpp; `_llamacpp` the leaf module
                  of raw llama.cpp calls (contexts, batches, vocabulary checks, ggml's RPC devices);
                  `_batching` how running requests split into decodes, by measured cost per width.
- `_rpc_stage`    a dense split stage's child: builds its RPC cache files, runs llama.cpp's RPC server.
- `_fake`         `FakeEngine` for tests (delay, crash, hang).
- `_drafter`      the speculative-drafter actor (a draft model next to the target);
                  `_speculative` prompt lookup, draft length, the governor.
- `_textstream`   token bytes -> safe text (partial UTF-8, stop strings).

Nothing here is imported by the node's own process except through the child's argv.
"""

from actors.engine._engine import Engine, EngineEvent, check_context

__all__ = ["Engine", "EngineEvent", "check_context"]

"""Finding the model a node serves: a user's GGUF, or the built-in default synthesized once."""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
DEFAULT_MODEL_NAME = "mesh-llm-demo-random"  # says what it is: a demo with random weights


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mesh-llm"


def default_model() -> Path:
    """The built-in default model, synthesized on first use and cached. Nodes started together
    on one machine take turns (a file lock): one writes it, the others find it written."""
    path = cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}.gguf"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with (path.parent / ".synth.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            log.warning(
                "synthesizing the built-in default model at %s (RANDOM WEIGHTS: its text is gibberish)", path
            )
            from actors.gguf import shape_for, synthesize  # numpy and gguf: only when synthesizing

            synthesize("llama", path, shape_for("llama", "small"), dtype="f16", seed=0)
    return path

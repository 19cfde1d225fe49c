"""Shared fixtures: leaked-thread check, synthesized models. Helpers live in `tests/support/`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.gguf import shape_for, synthesize


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a thread running (actors must join their threads on stop)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 2.0
    leaked: list[threading.Thread] = []
    while time.monotonic() < deadline:
        leaked = [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and (not t.daemon or t.name.startswith("actor-"))
        ]
        if not leaked:
            return
        time.sleep(0.02)
    pytest.fail(f"leaked threads: {[t.name for t in leaked]}")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(models_dir: Path) -> Path:
    """A tiny dense llama GGUF (random weights) that loads in milliseconds."""
    return synthesize("llama", models_dir / "tiny-llama.gguf", shape_for("llama", "tiny"), seed=1)

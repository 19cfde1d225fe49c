"""Shared fixtures: leaked-thread check, synthesized models. Helpers live in `tests/support/`."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from actors.gguf import shape_for, synthesize

_TRACE = os.environ.get("MESH_LLM_TEST_TRACE")  # `make test`: the test running now, in this file


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    """Note the test that starts, so that a crash of pytest itself (native code aborting) can be
    pinned on it; `make test` prints the file's content if pytest dies."""
    if _TRACE:
        with open(_TRACE, "w") as f:
            f.write(nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _TRACE and os.path.exists(_TRACE):
        os.unlink(_TRACE)


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


@pytest.fixture
def zmq_ctx() -> Iterator[zmq.Context]:
    """A ZeroMQ context that must terminate cleanly after the test: `term()` waits for every
    socket of the context to be closed, so a socket a test or an actor leaked fails the test."""
    ctx = zmq.Context()
    yield ctx
    done = threading.Event()
    threading.Thread(target=lambda: (ctx.term(), done.set()), name="zmq-term", daemon=True).start()
    if not done.wait(5.0):
        gc.collect()  # a socket nothing refers to any more is closed by its finalizer
        if not done.wait(2.0):
            # Not `ctx.destroy()`: closing a socket another thread may still use aborts the whole
            # run inside libzmq. The context and its term thread are left behind instead.
            pytest.fail("leaked ZeroMQ sockets: the context did not terminate within 5 s of the test")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(models_dir: Path) -> Path:
    """A tiny dense llama GGUF (random weights) that loads in milliseconds."""
    return synthesize("llama", models_dir / "tiny-llama.gguf", shape_for("llama", "tiny"), seed=1)

"""The gunicorn worker class that runs the ASGI app on uvicorn (uvloop and httptools where they
are installed), with a bound on open connections: past `MESH_LLM_HTTP_CONNECTIONS` a new one gets
503 at once instead of costing memory we did not choose to spend; and a server loop that wakes
once a second, not ten times, while nothing happens."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from types import FrameType
from typing import Any

from gunicorn.arbiter import Arbiter
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

TICK_S = 1.0  # the Date header and gunicorn's heartbeat are renewed once a second anyway


class _QuietServer(Server):
    """uvicorn's server with its housekeeping tick once a second (uvicorn's own ticks ten times a
    second: ~2 ms of CPU a second for a worker that serves nothing). An exit signal wakes it at
    once, so stopping takes no longer."""

    _wake: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    async def main_loop(self) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 10) % 864000  # uvicorn's tick counts tenths of a second
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    await self._wake.wait()
            should_exit = await self.on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)


class MeshWorker(UvicornWorker):
    CONFIG_KWARGS: dict[str, Any] = {
        "loop": "auto",
        "http": "auto",
        "limit_concurrency": int(os.environ.get("MESH_LLM_HTTP_CONNECTIONS", "1024")),
    }

    async def _serve(self) -> None:  # UvicornWorker's, with the quiet server
        self.config.app = self.wsgi
        server = _QuietServer(config=self.config)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)

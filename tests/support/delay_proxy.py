"""A TCP proxy that delays every byte by a fixed time in each direction (netem does not exist
here), and counts them. Runs an asyncio loop on its own thread; `close()` stops it and every
connection."""

from __future__ import annotations

import asyncio
import threading
import time


class DelayProxy:
    """Listens on 127.0.0.1:`listen_port` for each (listen_port, target_port) pair."""

    def __init__(self, pairs: list[tuple[int, int]], delay_s: float) -> None:
        self.pairs = pairs
        self.delay_s = delay_s
        self.bytes: dict[int, int] = {listen: 0 for listen, _ in pairs}  # both ways, per listen port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._servers: list[asyncio.base_events.Server] = []
        self._thread = threading.Thread(target=self._run, name="delay-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("delay proxy did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        for listen, target in self.pairs:
            server = self._loop.run_until_complete(
                asyncio.start_server(
                    lambda r, w, t=target, port=listen: self._serve(r, w, t, port), "127.0.0.1", listen
                )
            )
            self._servers.append(server)
        self._ready.set()
        self._loop.run_forever()
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        # Until every cancelled task has ended (one pass leaves gathers pending, and the loop
        # then complains at exit that a pending task was destroyed).
        self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self._loop.close()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: int, port: int
    ) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            self._pump(reader, up_writer, port), self._pump(up_reader, writer, port), return_exceptions=True
        )

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(65536):
                self.bytes[port] += len(data)
                queue.put_nowait((time.monotonic() + self.delay_s, data))
        finally:
            queue.put_nowait((0.0, b""))
            await asyncio.gather(sender, return_exceptions=True)
            writer.close()

    def close(self) -> None:
        for server in self._servers:
            self._loop.call_soon_threadsafe(server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

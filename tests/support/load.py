"""Steady load for elastic-serving tests and benchmarks: client threads each asking for one long
completion after another, each a new conversation (a session's turns stay on its node)."""

from __future__ import annotations

import threading
import time

import httpx

from tests.support.nodes import NodeProcess


class Load:
    """`clients` threads each streaming one long request after another through `node` until stopped."""

    def __init__(self, node: NodeProcess, model: str, clients: int, max_tokens: int = 300) -> None:
        self.node, self.model, self.max_tokens = node, model, max_tokens
        self.waits: list[tuple[float, float]] = []  # (when it began, seconds to the answer)
        self.refused: list[float] = []  # when a 429 came
        self.stop = threading.Event()
        self.accept_429 = False  # a 429 is a failure unless told otherwise
        self.served_by: list[str] = []
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def _client(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1  # a new conversation each time (a session's turns stay on its node)
            body = {
                "model": self.model, "prompt": "x", "max_tokens": self.max_tokens, "temperature": 0,
                "user": f"{i}-{n}",
            }  # fmt: skip
            began = time.monotonic()
            try:
                r = httpx.post(f"{self.node.url}/v1/completions", json=body, timeout=120)
            except httpx.HTTPError as err:
                self.failures.append(repr(err))
                continue
            if r.status_code == 429 and self.accept_429:
                self.refused.append(began)
                time.sleep(0.25)
            elif r.status_code != 200 or r.json()["choices"][0]["finish_reason"] != "length":
                self.failures.append(f"{r.status_code} {r.text[:200]}")
            else:
                self.served_by.append(r.headers["X-Mesh-Node"])
                self.waits.append((began, time.monotonic() - began))

"""Driving the ASGI app in-process as a real server would: httpx's ASGI transport, whose
`receive()` reports a disconnect only once the response is complete (falcon's TestClient
reports one as soon as the body is sent, which our disconnect watch would rightly act on)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Result:
    status_code: int
    headers: httpx.Headers
    text: str

    @property
    def json(self) -> Any:
        return json.loads(self.text)


class AsgiClient:
    """`simulate_get/post/head` over an ASGI app, one event loop per call."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def simulate_request(self, method: str, path: str, **kwargs: Any) -> Result:
        async def call() -> Result:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                response = await client.request(method, path, **kwargs)
                return Result(response.status_code, response.headers, response.text)

        return asyncio.run(call())

    def simulate_get(self, path: str, **kwargs: Any) -> Result:
        return self.simulate_request("GET", path, **kwargs)

    def simulate_head(self, path: str, **kwargs: Any) -> Result:
        return self.simulate_request("HEAD", path, **kwargs)

    def simulate_post(self, path: str, *, body: bytes | None = None, **kwargs: Any) -> Result:
        if body is not None:
            kwargs["content"] = body
        return self.simulate_request("POST", path, **kwargs)

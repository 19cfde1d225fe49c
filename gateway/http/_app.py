"""The ASGI app: `create_app(backend, ...)` for tests, `get_app()` for the HTTP server.

It runs under gunicorn with uvicorn workers: every connection is a coroutine, so clients that
trickle their headers or body, or read slowly, hold no thread and lock nobody out.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import falcon
import falcon.asgi

from actors._config import MAX_BODY_BYTES, MAX_FRAME_BYTES
from gateway.http._backend import Backend, RouterClient
from gateway.http._dialects import Messages, Responses
from gateway.http._errors import ApiError, handle_error
from gateway.http._resources import ChatCompletions, Completions, Embeddings, Health, Models

_OPEN_PATHS = ("/health",)
_EXPOSED = ("X-Mesh-Node", "Retry-After")  # response headers a browser app may read

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[Mapping[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class _MeshHeaders:
    """Every response says which node produced it; configured API keys guard all but /health
    (any one of them opens the API)."""

    def __init__(self, node_id: str, api_keys: Sequence[str]) -> None:
        self.node_id = node_id
        self.api_keys = [k.encode() for k in api_keys if k]

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        req.context.mesh_node = self.node_id
        if not self.api_keys or req.path in _OPEN_PATHS or req.method == "OPTIONS":
            return  # (a browser's CORS preflight carries no key; it starts nothing)
        scheme, _, given = (req.get_header("Authorization") or "").partition(" ")
        key = given.strip().encode()
        # Compare with every key (no early exit): the time taken does not say which one was close.
        matches = [hmac.compare_digest(key, k) for k in self.api_keys]
        if scheme.lower() != "bearer" or not any(matches):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def process_response(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, resource: object, ok: bool
    ) -> None:
        resp.set_header("X-Mesh-Node", req.context.mesh_node)


class WatchDisconnect:
    """ASGI wrapper: once the request body has been read, watch the connection, and if the client
    goes before its response is complete, cancel the request's task at once — a request waiting
    for its first token (streaming or not) is cancelled then, not when it next writes. The
    cancellation closes the backend stream, which tells the router to stop. Costs nothing per
    token: one watcher task per request."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        task = asyncio.current_task()
        watcher: asyncio.Task[None] | None = None
        gone = complete = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            if not complete and task is not None:
                gone = True
                task.cancel()

        async def body_then_watch() -> Mapping[str, Any]:
            nonlocal watcher
            event = await receive()
            if event["type"] == "http.request" and not event.get("more_body", False) and watcher is None:
                watcher = asyncio.get_running_loop().create_task(watch())
            return event

        async def send_and_note(message: dict[str, Any]) -> None:
            nonlocal complete
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        try:
            await self.app(scope, body_then_watch, send_and_note)
        except asyncio.CancelledError:
            if not gone:
                raise  # not ours: the server is shutting down
        finally:
            if watcher is not None:
                watcher.cancel()


def create_app(
    backend: Backend,
    *,
    node_id: str,
    api_key: str | Sequence[str] | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    cors_origins: Sequence[str] = (),
) -> WatchDisconnect:
    """The OpenAI-compatible API over `backend`, as an ASGI app. `cors_origins`: the browser
    origins (or "*") allowed to call it from another origin (falcon's CORS middleware answers
    their preflights)."""
    keys = [api_key] if isinstance(api_key, str) else list(api_key or ())
    middleware: list[Any] = [_MeshHeaders(node_id, keys)]
    if cors_origins:
        origins = "*" if "*" in cors_origins else list(cors_origins)
        middleware.append(falcon.CORSMiddleware(allow_origins=origins, expose_headers=_EXPOSED))
    app = falcon.asgi.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    app.add_error_handler(Exception, handle_error)
    app.add_error_handler(falcon.HTTPError, handle_error)
    app.add_route("/health", Health(backend))
    models = Models(backend)
    app.add_route("/v1/models", models)
    app.add_route("/v1/models/{model_id}", models, suffix="model")
    app.add_route("/v1/chat/completions", ChatCompletions(backend, max_body_bytes))
    app.add_route("/v1/completions", Completions(backend, max_body_bytes))
    app.add_route("/v1/embeddings", Embeddings(backend, max_body_bytes))
    app.add_route("/v1/responses", Responses(backend, max_body_bytes))
    app.add_route("/v1/messages", Messages(backend, max_body_bytes))
    return WatchDisconnect(app)


def get_app() -> WatchDisconnect:
    """The app the HTTP server serves, configured by the `MESH_LLM_*` variables `mesh-llm serve` sets."""
    env = os.environ
    backend = RouterClient(
        env["MESH_LLM_ROUTER"],
        idle_timeout_s=float(env.get("MESH_LLM_IDLE_TIMEOUT_S", "15")),
        max_frame_bytes=int(env.get("MESH_LLM_MAX_FRAME_BYTES", MAX_FRAME_BYTES)),
    )
    return create_app(
        backend,
        node_id=env["MESH_LLM_NODE_ID"],
        api_key=env.get("MESH_LLM_API_KEYS", "").split("\n"),
        max_body_bytes=int(env.get("MESH_LLM_MAX_BODY_BYTES", MAX_BODY_BYTES)),
        cors_origins=env.get("MESH_LLM_CORS_ORIGINS", "").split(),
    )

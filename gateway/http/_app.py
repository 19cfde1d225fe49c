"""The Falcon app: `create_app(backend, ...)` for tests, `get_app()` for gunicorn."""

from __future__ import annotations

import hmac
import os
import socket

import falcon

from gateway.http._backend import Backend, RouterClient
from gateway.http._errors import ApiError, handle_error
from gateway.http._resources import ChatCompletions, Completions, Health, Models

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
_OPEN_PATHS = ("/health",)


class _MeshHeaders:
    """Every response says which node produced it; a configured API key guards all but /health."""

    def __init__(self, node_id: str, api_key: str | None) -> None:
        self.node_id = node_id
        self.api_key = api_key.encode() if api_key else None

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.mesh_node = self.node_id
        _no_delay(req.env.get("gunicorn.socket"))
        if self.api_key is None or req.path in _OPEN_PATHS:
            return
        scheme, _, given = (req.get_header("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, ok: bool
    ) -> None:
        resp.set_header("X-Mesh-Node", req.context.mesh_node)


def _no_delay(sock: socket.socket | None) -> None:
    """Send each token as soon as it is written: Nagle's algorithm would hold small writes back
    until the client's (delayed) ACK, adding up to 40 ms to the first token of a stream."""
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # the client already left; the response write will notice


def create_app(
    backend: Backend,
    *,
    node_id: str,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> falcon.App:
    """The OpenAI-compatible API over `backend`."""
    app = falcon.App(middleware=[_MeshHeaders(node_id, api_key)])
    app.req_options.strip_url_path_trailing_slash = True
    app.add_error_handler(Exception, handle_error)
    app.add_error_handler(falcon.HTTPError, handle_error)
    app.add_route("/health", Health(backend))
    app.add_route("/v1/models", Models(backend))
    app.add_route("/v1/chat/completions", ChatCompletions(backend, max_body_bytes))
    app.add_route("/v1/completions", Completions(backend, max_body_bytes))
    return app


def get_app() -> falcon.App:
    """The app gunicorn serves, configured by the `MESH_LLM_*` variables `mesh-llm serve` sets."""
    env = os.environ
    backend = RouterClient(
        env["MESH_LLM_ROUTER"], idle_timeout_s=float(env.get("MESH_LLM_IDLE_TIMEOUT_S", "15"))
    )
    return create_app(
        backend,
        node_id=env["MESH_LLM_NODE_ID"],
        api_key=env.get("MESH_LLM_API_KEY") or None,
        max_body_bytes=int(env.get("MESH_LLM_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES)),
    )

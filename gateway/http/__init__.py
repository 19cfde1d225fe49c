"""The OpenAI-compatible HTTP API.

- `_app`        `create_app(backend, ...)` for tests, `get_app()` for the HTTP server.
- `_resources`  /health, /v1/models, /v1/chat/completions, /v1/completions (JSON and SSE).
- `_requests`   OpenAI request bodies -> `Generate`; `_errors` errors -> OpenAI error objects.
- `_backend`    `Backend` protocol (the test seam) and `RouterClient` (ZeroMQ to the router).
"""

from gateway.http._app import create_app, get_app
from gateway.http._backend import Backend, RouterClient
from gateway.http._errors import ApiError

__all__ = ["ApiError", "Backend", "RouterClient", "create_app", "get_app"]

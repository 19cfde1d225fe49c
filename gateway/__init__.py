"""The HTTP API and the command-line entry points.

Map of this room:
- `_app`        Falcon app: `create_app(backend, ...)` for tests, `get_app()` for gunicorn.
- `_resources`  /health, /v1/models, /v1/chat/completions, /v1/completions (JSON and SSE).
- `_requests`   OpenAI request bodies -> `Generate`; `_errors` errors -> OpenAI error objects.
- `_backend`    `Backend` protocol (the test seam) and `RouterClient` (ZeroMQ to the router).
- `_cli`        `mesh-llm serve`; `_ctl` `mesh-ctl`; `_models` the default model and checks.
"""

from gateway._app import create_app, get_app
from gateway._backend import Backend, RouterClient
from gateway._cli import main as mesh_llm_main
from gateway._ctl import main as mesh_ctl_main
from gateway._errors import ApiError

__all__ = ["ApiError", "Backend", "RouterClient", "create_app", "get_app", "mesh_ctl_main", "mesh_llm_main"]

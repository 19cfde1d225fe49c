"""The gunicorn worker class that runs the ASGI app on uvicorn (uvloop and httptools where they
are installed), with a bound on open connections: past `MESH_LLM_HTTP_CONNECTIONS` a new one gets
503 at once instead of costing memory we did not choose to spend."""

from __future__ import annotations

import os
from typing import Any

from uvicorn_worker import UvicornWorker


class MeshWorker(UvicornWorker):
    CONFIG_KWARGS: dict[str, Any] = {
        "loop": "auto",
        "http": "auto",
        "limit_concurrency": int(os.environ.get("MESH_LLM_HTTP_CONNECTIONS", "1024")),
    }

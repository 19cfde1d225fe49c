"""gunicorn settings for `mesh-llm serve`, loaded with `-c python:gateway.http._gunicorn_conf`."""

from __future__ import annotations

import os

from actors.runtime._supervisor import die_with_parent


def on_starting(server: object) -> None:
    """In the gunicorn master: die with the node, so that a killed node leaves no HTTP server."""
    parent = os.environ.get("MESH_LLM_PARENT_PID")
    if parent:
        die_with_parent(int(parent))


def post_fork(server: object, worker: object) -> None:
    """In each HTTP worker: die with the gunicorn master (uvicorn workers, unlike gunicorn's own,
    do not watch for it), so that a killed node leaves no HTTP worker behind."""
    die_with_parent(os.getppid())

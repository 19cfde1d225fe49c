"""The HTTP API and the command-line entry points.

Map of this room:
- `http/`  the Falcon app and its resources, request parsing, errors, the router client.
- `cli/`   `mesh-llm` (run a node); `ctl/` `mesh-ctl` (operate one).

Importing `gateway` (as each HTTP worker does) loads the HTTP app only: the command-line entry
points import their rooms when called.
"""

from __future__ import annotations

from gateway.http import ApiError, Backend, RouterClient, create_app, get_app


def mesh_llm_main(argv: list[str] | None = None) -> int:
    """The `mesh-llm` console script."""
    from gateway.cli import main

    return main(argv)


def mesh_ctl_main(argv: list[str] | None = None) -> int:
    """The `mesh-ctl` console script."""
    from gateway.ctl import main

    return main(argv)


__all__ = ["ApiError", "Backend", "RouterClient", "create_app", "get_app", "mesh_ctl_main", "mesh_llm_main"]

"""The HTTP API and the command-line entry points.

Map of this room:
- `http/`  the Falcon app and its resources, request parsing, errors, the router client.
- `cli/`   `mesh-llm` (run a node); `ctl/` `mesh-ctl` (operate one).

Importing `gateway` loads only the light `actors` surface (config, errors, the wire). The HTTP
app's names (as an HTTP worker asks for `gateway:get_app()`) load `http/` when first asked for,
and the command-line entry points import their rooms when called: a node process, which serves
no HTTP itself, does not pay for Falcon on its way to starting its engine (measured: ~0.17 s of
a ~0.6 s start-up on 2 cores).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from actors._lazy import lazy_names

if TYPE_CHECKING:
    from gateway.http import ApiError, Backend, RouterClient, create_app, get_app

__getattr__ = lazy_names(
    __name__, dict.fromkeys(("ApiError", "Backend", "RouterClient", "create_app", "get_app"), "gateway.http")
)


def mesh_llm_main(argv: list[str] | None = None) -> int:
    """The `mesh-llm` console script."""
    from gateway.cli import main

    return main(argv)


def mesh_ctl_main(argv: list[str] | None = None) -> int:
    """The `mesh-ctl` console script."""
    from gateway.ctl import main

    return main(argv)


__all__ = ["ApiError", "Backend", "RouterClient", "create_app", "get_app", "mesh_ctl_main", "mesh_llm_main"]

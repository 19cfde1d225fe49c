"""Names a package exports but loads only when first asked for (PEP 562): the package's
`__getattr__`, so that a process importing the package for one light name (an engine child, a node
process) does not pay for the heavy modules behind the others. Type checkers see the names through
the package's own `if TYPE_CHECKING:` imports."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_names(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: `where` maps each lazy name to the module that
    defines it; any other name is an AttributeError, as without it."""

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return __getattr__

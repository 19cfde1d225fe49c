"""Guards on the import graph: every module imports on its own in a fresh interpreter (no import
cycle held together by import order), the HTTP workers' `import gateway` stays light, and the
processes on the way to a node's first /health 200 (the node, its engine child) import only what
they use."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import actors
import discovery
import gateway


def _modules() -> list[str]:
    names = []
    for package in (actors, discovery, gateway):
        names.append(package.__name__)
        prefix = package.__name__ + "."
        names += [m.name for m in pkgutil.walk_packages(package.__path__, prefix)]
    return sorted(names)


def _import_alone(module: str) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    return module, done.stderr.strip().splitlines()[-1] if done.returncode else ""


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    modules = _modules()
    assert len(modules) > 50
    with ThreadPoolExecutor(4) as pool:
        failures = {m: err for m, err in pool.map(_import_alone, modules) if err}
    assert failures == {}


def test_import_gateway_loads_neither_numpy_nor_llama_cpp() -> None:
    code = "import sys, gateway; print(sorted(m for m in ('numpy', 'llama_cpp', 'gguf') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _loaded(statement: str, modules: tuple[str, ...]) -> list[str]:
    """Which of `modules` a fresh interpreter has loaded after `statement`."""
    found = f"sorted(m for m in {modules!r} if m in sys.modules)"
    code = f"import json, sys; {statement}; print(json.dumps({found}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return list(json.loads(out.stdout))


def test_a_node_process_starts_without_the_http_app_numpy_or_llama_cpp() -> None:
    heavy = ("falcon", "numpy", "gguf", "llama_cpp", "gateway.http")
    assert _loaded("import gateway.cli._serve", heavy) == []


def test_an_engine_child_starts_without_the_node_or_the_http_app() -> None:
    heavy = ("actors.node", "actors.routing", "discovery", "zeroconf", "falcon", "gguf")
    assert _loaded("import actors.engine._child", heavy) == []


def test_names_loaded_on_first_use_resolve_and_unknown_ones_still_fail() -> None:
    statement = (
        "import actors, actors.gguf, actors.runtime, gateway; "
        "assert actors.Node.__name__ == 'Node' and actors.ask.__name__ == 'ask'; "
        "assert actors.runtime.Actor is actors.Actor and callable(gateway.get_app); "
        "assert actors.gguf.synthesize.__name__ == 'synthesize' and 'tiny' in actors.gguf.PRESETS; "
        "from actors import *; from gateway import *; from actors.gguf import *"
    )
    assert _loaded(statement, ("actors.node", "gateway.http", "numpy")) == [
        "actors.node",
        "gateway.http",
        "numpy",
    ]
    for module in ("actors", "actors.gguf", "actors.runtime", "gateway"):
        failed = subprocess.run(
            [sys.executable, "-c", f"import {module}; {module}.no_such_name"], capture_output=True, text=True
        )
        assert failed.returncode == 1 and "has no attribute 'no_such_name'" in failed.stderr

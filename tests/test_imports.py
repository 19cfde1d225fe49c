"""Guards on the import graph: every module imports on its own in a fresh interpreter (no import
cycle held together by import order), and the HTTP workers' `import gateway` stays light."""

from __future__ import annotations

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

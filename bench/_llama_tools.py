"""llama.cpp's own `llama-server` and `llama-bench`, built from the very source and flags the node's
llama.cpp is (the pinned llama-cpp-python sdist, the project's patch, the Makefile's CMake flags),
once, into ~/.cache/mesh-llm/llama-tools/<key>/: the yardsticks bench/overhead.py measures the
mesh against. Nothing is downloaded but the sdist the install already keeps."""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from tests.support.llama_builds import CACHE, pinned_sdist

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("llama-server", "llama-bench")


def _make_var(name: str) -> str:
    done = subprocess.run(
        ["make", "-s", "--no-print-directory", f"print-{name}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def llama_tools() -> dict[str, Path]:
    """{"llama-server": path, "llama-bench": path}, built the first time (about 6 minutes on 2
    cores)."""
    version, patch = _make_var("LLAMA_VERSION"), ROOT / _make_var("LLAMA_PATCH")
    cmake_args = shlex.split(_make_var("LLAMA_CMAKE_ARGS"))
    key = hashlib.sha1(f"{version} {cmake_args}".encode() + patch.read_bytes()).hexdigest()[:12]
    home = CACHE / "llama-tools" / key
    tools = {name: home / "bin" / name for name in TOOLS}
    if all(p.exists() for p in tools.values()):
        return tools
    sdist = pinned_sdist(version)
    print(f"building {', '.join(TOOLS)} from llama-cpp-python {version}'s llama.cpp (once) ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = Path(tmp) / f"llama_cpp_python-{version}"
        subprocess.run(["git", "apply", "-p1", str(patch)], cwd=src, check=True)
        build = Path(tmp) / "build"
        subprocess.run(
            ["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
             *cmake_args, "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_CURL=OFF"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        subprocess.run(
            ["cmake", "--build", str(build), "--target", *TOOLS, "-j", str(os.cpu_count() or 1)],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        (home / "bin").mkdir(parents=True, exist_ok=True)
        for name, path in tools.items():
            shutil.copy2(build / "bin" / name, path)
    return tools


if __name__ == "__main__":
    for name, path in llama_tools().items():
        print(name, path)

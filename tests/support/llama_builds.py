"""llama.cpp as users may have it: the pinned sdist the install patches, and a stock build of its
RPC backend (without the project's patch), for nodes that must run as an unpatched user's would."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from actors.engine._llamacpp import has_file_tensors, library_has_file_tensors

CACHE = Path.home() / ".cache" / "mesh-llm"


def llama_cpp_version() -> str:
    return importlib.metadata.version("llama_cpp_python")


def pinned_sdist(version: str | None = None) -> Path:
    """The llama-cpp-python sdist the install builds from (patches/build-wheel.sh keeps it in the
    cache; fetched from PyPI if it is not there); by default of the installed version."""
    version = version or llama_cpp_version()
    sdist = CACHE / "sdist" / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={version}", "-d", str(sdist.parent)],
            check=True,
        )  # fmt: skip
    return sdist


def stock_llama_cpp() -> Path:
    """A directory to put first on PYTHONPATH: a copy of the installed `llama_cpp` package whose RPC
    backend (libggml-rpc) is compiled from the unpatched sdist, everything else shared. Built once
    (about 20 s) and kept in the cache by version."""
    import llama_cpp

    version = llama_cpp_version()
    installed = Path(llama_cpp.__file__).parent
    key = hashlib.sha1(f"{version} {(installed / 'lib' / 'libggml-base.so.0').stat().st_size}".encode())
    site = CACHE / "stock-rpc" / key.hexdigest()[:12]
    lib = site / "llama_cpp" / "lib"
    if (lib / "libggml-rpc.so.0").exists():
        return site
    with tempfile.TemporaryDirectory() as tmp:
        root = f"llama_cpp_python-{version}/vendor/llama.cpp/ggml"
        with tarfile.open(pinned_sdist()) as tar:
            members = [
                m for m in tar.getmembers()
                if m.name.startswith(f"{root}/include/") or m.name.startswith(f"{root}/src/ggml-rpc/")
                or (m.name.startswith(f"{root}/src/") and m.name.endswith(".h") and m.name.count("/") == 5)
            ]  # fmt: skip
            tar.extractall(tmp, members=members, filter="data")
        src = Path(tmp) / root
        staging = Path(tmp) / "site"
        shutil.copytree(
            installed, staging / "llama_cpp", symlinks=False, ignore=shutil.ignore_patterns("__pycache__")
        )
        out = staging / "llama_cpp" / "lib" / "libggml-rpc.so.0"
        out.unlink()
        # The flags ggml's CMake gives this library (AVX flags do not matter to it).
        subprocess.run(
            ["c++", "-O2", "-fPIC", "-shared", "-std=gnu++17", "-DNDEBUG", "-DGGML_BACKEND_BUILD",
             "-DGGML_BACKEND_SHARED", "-DGGML_SHARED", "-D_GNU_SOURCE", "-D_XOPEN_SOURCE=600",
             "-Dggml_rpc_EXPORTS",
             f"-I{src / 'src'}", f"-I{src / 'include'}",
             str(src / "src/ggml-rpc/ggml-rpc.cpp"), str(src / "src/ggml-rpc/transport.cpp"),
             "-Wl,-soname,libggml-rpc.so.0", "-Wl,-rpath,$ORIGIN", f"-L{out.parent}", "-l:libggml-base.so.0",
             "-o", str(out)],
            check=True,
        )  # fmt: skip
        for name in ("libggml-rpc.so", "libggml-rpc.so.0.25.3"):
            if (out.parent / name).exists():
                (out.parent / name).unlink()
                shutil.copy(out, out.parent / name)
        site.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(site, ignore_errors=True)
        os.replace(staging, site)
    return site


def is_patched(site: Path | None = None) -> bool:
    """Whether the llama_cpp found first (on `site`, else as installed) has the project's patch."""
    if site is None:
        return has_file_tensors()
    return library_has_file_tensors(str(site / "llama_cpp" / "lib"))

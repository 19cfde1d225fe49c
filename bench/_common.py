"""Shared benchmark plumbing: machine facts, result files, free ports, process lifetimes and the
CPU time of a process tree."""

from __future__ import annotations

import atexit
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.support.nodes import free_port_pair, stop_process

__all__ = ["free_port_pair", "stop_process"]  # ports and stops: the tests' own helpers

RESULTS = Path(__file__).parent / "results"


def scratch_dir(prefix: str) -> Path:
    """A new directory for a benchmark's models and state, removed when the benchmark exits
    (models are hundreds of MB; a run must not leave them behind)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import llama_cpp

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "llama_cpp_python": llama_cpp.__version__,
    }


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    doc = {
        "name": name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine(),
        **payload,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def print_targets(targets: dict[str, bool], path: Path) -> None:
    """The closing lines of every benchmark: each target met or missed, and where the figures are."""
    for target, ok in targets.items():
        print(f"  {'PASS' if ok else 'MISS'}  {target}")
    print(f"\nwritten to {path}")


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (children hang off the thread that started them)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def cpu_seconds(pid: int, only: bytes = b"") -> float:
    """CPU time (user + system) so far of `pid` and its descendants (those whose command line
    holds `only`, if given), in 10 ms ticks but with the threads that ended: for totals over a
    run. `cpu_ns_by_role` is exact, for short spans."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            if only and only not in Path(f"/proc/{p}/cmdline").read_bytes():
                continue
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def cpu_ns_by_role(pid: int, roles: dict[str, bytes], default: str) -> dict[str, int]:
    """Nanoseconds of CPU so far of `pid` and its descendants, summed by role: a process is the
    first role whose marker its command line holds, else `default` (see `threads_cpu_ns`)."""
    out: dict[str, int] = {}
    for p in process_tree(pid):
        try:
            cmdline = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        role = next((name for name, marker in roles.items() if marker in cmdline), default)
        out[role] = out.get(role, 0) + threads_cpu_ns(Path(f"/proc/{p}"))
    return out


def threads_cpu_ns(proc: Path = Path("/proc/self")) -> int:
    """Nanoseconds of CPU so far of the threads of the process at `proc` (not its children's),
    from each one's schedstat: exact, where /proc/*/stat counts 10 ms ticks. Threads that ended
    are not counted."""
    total = 0
    try:
        tasks = list((proc / "task").iterdir())
    except OSError:
        return 0
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 300, poll_s: float = 0.2) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    raise RuntimeError(f"{url} not ready in {timeout_s}s")


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")

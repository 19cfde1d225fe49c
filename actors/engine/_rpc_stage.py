"""A stage's llama.cpp RPC server: the child process a stage node runs for a split's head.

Run as `python -m actors.engine._rpc_stage --listen HOST:PORT --model GGUF --layers FIRST,LAST
--cache-dir DIR --threads N --parent-pid P [--load-mode file|hash-cache|transfer --file-id ID]`.
`file` (the project's llama.cpp patch) has the server read the tensors the head names from its own
copy of the model, known to the head as `--file-id`; with the hash cache (stock llama.cpp) it first
writes the RPC cache files of its layers from its own copy, so that the head's loader sends hashes
instead of those tensors; `transfer` has the head send them all. Then it serves (blocking forever)
on a loopback address only: the head reaches it through the node's ZeroMQ tunnel. It dies with its
parent.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from actors.runtime._supervisor import die_with_parent

log = logging.getLogger("mesh_llm.stage")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mesh-llm-stage")
    parser.add_argument("--listen", required=True, help="HOST:PORT on loopback")
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--layers", required=True, help="FIRST,LAST (inclusive)")
    parser.add_argument("--cache-dir", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--load-mode", choices=("file", "hash-cache", "transfer"), default="hash-cache")
    parser.add_argument("--file-id", default="", help="the model's identity, as the head names it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s stage[%(process)d] %(levelname)s %(message)s")
    die_with_parent(args.parent_pid)
    host = args.listen.rpartition(":")[0]
    if not host.startswith("127."):
        raise SystemExit(f"mesh-llm-stage: refusing to listen on {host}: the RPC server is for loopback only")
    first, last = (int(x) for x in args.layers.split(","))
    import threading

    warm = threading.Thread(target=lambda: __import__("llama_cpp"), daemon=True)  # meanwhile
    warm.start()
    if args.load_mode == "hash-cache":
        from actors.gguf._layout import build_rpc_cache, read_layout

        started = time.monotonic()
        files, size = build_rpc_cache(read_layout(args.model), first, last, args.cache_dir)
        log.info(
            "layers %d-%d: wrote %d RPC cache files (%.1f MB) from %s in %.2f s",
            first, last, files, size / 1e6, args.model, time.monotonic() - started,
        )  # fmt: skip
    import ctypes

    warm.join()
    import llama_cpp

    from actors.engine._llamacpp import cpu_device, ggml_libraries

    ggml, rpc = ggml_libraries(llama_cpp)
    llama_cpp.llama_backend_init()
    devices = (ctypes.c_void_p * 1)(cpu_device(ggml))
    if args.load_mode == "file":
        if not hasattr(rpc, "ggml_backend_rpc_server_add_file"):
            raise SystemExit(
                "mesh-llm-stage: this llama.cpp lacks the project's RPC patch (file-backed tensors)"
            )
        if not args.file_id or not rpc.ggml_backend_rpc_server_add_file(
            args.file_id.encode(), str(args.model).encode()
        ):
            raise SystemExit(f"mesh-llm-stage: cannot serve tensors from {args.model} (not a readable GGUF)")
        log.info("layers %d-%d: serving tensors from %s as %s", first, last, args.model, args.file_id)
        threading.Thread(target=_read_ahead, args=(args.model, first, last), daemon=True).start()
    sys.stdout.flush()
    cache = str(args.cache_dir).encode() if args.load_mode == "hash-cache" else None  # stock: no cache
    rpc.ggml_backend_rpc_start_server(args.listen.encode(), cache, args.threads, 1, devices)
    # It returns only if it cannot listen.
    return 3


def _read_ahead(model: Path, first: int, last: int) -> None:
    """Have the kernel start reading our layers from disk now, while the head's engine starts: the
    head's first request for them then finds them in the page cache (nothing to wait for when
    they already are)."""
    import os

    from actors.gguf._layout import read_layout

    spans = read_layout(model).layer_tensors(first, last)
    if not spans:
        return
    start = min(t.offset for t in spans)
    end = max(t.offset + t.size for t in spans)
    fd = os.open(model, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


if __name__ == "__main__":
    sys.exit(main())

"""A stage's llama.cpp RPC server: the child process a stage node runs for a split's head.

Run as `python -m actors.engine._rpc_stage --listen HOST:PORT --model GGUF --layers FIRST,LAST
--cache-dir DIR --threads N --parent-pid P [--load-mode transfer]`. With the hash cache (the
default) it first writes the RPC cache files of its layers from its own copy of the model, so that
the head's loader sends hashes instead of those tensors; then it serves (blocking forever) on a
loopback address only: the head reaches it through the node's ZeroMQ tunnel. It dies with its
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
    parser.add_argument("--load-mode", choices=("hash-cache", "transfer"), default="hash-cache")
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
    sys.stdout.flush()
    cache = str(args.cache_dir).encode() if args.load_mode == "hash-cache" else None  # stock: no cache
    rpc.ggml_backend_rpc_start_server(args.listen.encode(), cache, args.threads, 1, devices)
    # It returns only if it cannot listen.
    return 3


if __name__ == "__main__":
    sys.exit(main())

"""What does the mesh cost over llama.cpp itself? Three ways to serve one model, side by side:

  in-process   llama-cpp-python's create_completion(stream=True) in this process
  mesh         a `mesh-llm serve` node over HTTP, streaming (gunicorn -> router -> worker -> engine)
  llama-server llama-cpp-python's own OpenAI server (`python -m llama_cpp.server`), streaming

Same synthesized model (about 110M parameters, random weights), same prompts, greedy decoding,
with 1 and with 4 concurrent clients, all four ways running at once and measured in interleaved
rounds. Figures: time to first token and decode throughput. (in-process-raw is the bare
`Llama.generate` loop; the ratios use the better of the two in-process ways.)
Writes bench/results/overhead.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.gguf import shape_for, synthesize
from bench._common import free_port_pair, p50, stop_process, wait_http, write_result

BIN = Path(sys.executable).parent
MODEL_ID = "bench-100m"


class Sample:
    """One request as a client saw it."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.first: float | None = None
        self.last = start
        self.tokens = 0

    def token(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now
        self.tokens += 1

    @property
    def ttft_ms(self) -> float:
        assert self.first is not None
        return (self.first - self.start) * 1000

    @property
    def decode_tps(self) -> float:
        assert self.first is not None
        return (self.tokens - 1) / (self.last - self.first) if self.last > self.first else 0.0


def prompts(n: int) -> list[str]:
    topics = ["a lighthouse", "the mesh", "ZeroMQ sockets", "a rainy day", "old machines", "gossip", "tea"]
    return [
        f"Request {i}: write a short story about {topics[i % len(topics)]} and what it learns."
        for i in range(n)
    ]


def in_process_client(model: Path, threads: int, ctx: int, *, raw: bool) -> Callable[[str, int], Sample]:
    """create_completion(stream=True), as a user would write it; or, with `raw`, the bare token
    loop (`Llama.generate` + detokenize), the fastest a single in-process caller can go."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(model), n_ctx=ctx, n_threads=threads, n_threads_batch=threads, verbose=False
    )

    def completion(prompt: str, max_tokens: int, sample: Sample) -> None:
        for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stream=True):
            if chunk["choices"][0]["text"]:
                sample.token()

    def token_loop(prompt: str, max_tokens: int, sample: Sample) -> None:
        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        for n, token in enumerate(llm.generate(tokens, temp=0.0, top_k=0, top_p=1.0, min_p=0.0)):
            if llm.detokenize([token]):
                sample.token()
            if n + 1 == max_tokens:
                break

    body = token_loop if raw else completion
    jobs: queue.SimpleQueue[tuple[str, int, Sample, threading.Event]] = queue.SimpleQueue()

    def serve() -> None:  # one llama context: requests are served in arrival order
        while True:
            prompt, max_tokens, sample, done = jobs.get()
            body(prompt, max_tokens, sample)
            done.set()

    threading.Thread(target=serve, name="in-process-llama", daemon=True).start()

    def run(prompt: str, max_tokens: int) -> Sample:
        sample = Sample(time.perf_counter())  # time in the queue counts, as in a server's
        done = threading.Event()
        jobs.put((prompt, max_tokens, sample, done))
        done.wait()
        return sample

    return run


def http_client(base: str, model: str) -> Callable[[str, int], Sample]:
    """A streaming client per thread that keeps its connection, as the openai client does."""
    import httpx

    local = threading.local()

    def run(prompt: str, max_tokens: int) -> Sample:
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
        }
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=600)  # made before the clock starts: setup, not latency
        sample = Sample(time.perf_counter())
        with local.client.stream("POST", f"{base}/v1/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if json.loads(line[6:])["choices"][0]["text"]:
                    sample.token()
        return sample

    return run


def measure(
    run: Callable[[str, int], Sample], clients: int, per_client: int, max_tokens: int
) -> tuple[list[Sample], float]:
    """`clients` threads each sending `per_client` requests back to back; samples and wall time."""
    texts = prompts(clients * per_client)
    samples: list[Sample] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(per_client):
            s = run(texts[i * per_client + j], max_tokens)
            with lock:
                samples.append(s)

    start = time.perf_counter()
    workers = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return samples, time.perf_counter() - start


def summarize(samples: list[Sample], wall_s: float, clients: int) -> dict[str, Any]:
    tokens = sum(s.tokens for s in samples)
    return {
        "clients": clients,
        "requests": len(samples),
        "tokens": tokens,
        "ttft_ms_p50": round(p50([s.ttft_ms for s in samples]), 2),
        "ttft_ms_max": round(max(s.ttft_ms for s in samples), 2),
        "decode_tps_p50": round(p50([s.decode_tps for s in samples]), 2),
        "aggregate_tps": round(tokens / wall_s, 2),
        "wall_s": round(wall_s, 2),
    }


def interleaved(
    ways: dict[str, Callable[[str, int], Sample]], clients: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Every way measured in each of `rounds` rounds, in a rotating order, so that drift in the
    machine's speed (this is a shared VM) falls on all of them alike."""
    names = list(ways)
    samples: dict[str, list[Sample]] = {n: [] for n in names}
    walls = dict.fromkeys(names, 0.0)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            got, wall = measure(ways[name], clients, args.per_client, args.max_tokens)
            samples[name] += got
            walls[name] += wall
    return {n: summarize(samples[n], walls[n], clients) for n in names}


def start_mesh(model: Path, threads: int, ctx: int, state: Path) -> tuple[subprocess.Popen[bytes], str]:
    http, zmq_port = free_port_pair(1), free_port_pair()
    argv = [
        str(BIN / "mesh-llm"), "serve", "--model", str(model), "--host", "127.0.0.1",
        "--http-port", str(http), "--zmq-port", str(zmq_port), "--threads", str(threads),
        "--ctx", str(ctx), "--state-dir", str(state),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{http}"
    wait_http(f"{base}/health", proc)
    return proc, base


def start_llama_server(model: Path, threads: int, ctx: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port_pair(1)
    argv = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
        "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
        "--n_ctx", str(ctx), "--model_alias", MODEL_ID,
        # Its default cuts a running stream off whenever another request arrives; a server with
        # several clients must queue them instead, as the mesh does.
        "--interrupt_requests", "False",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/v1/models", proc)
    return proc, base


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="100m", help="synthesized model size (see mesh-ctl model synth)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--per-client", type=int, default=2, help="requests per client and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each measures every way once")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=2048)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
    model = synthesize("llama", work / f"{MODEL_ID}.gguf", shape_for("llama", args.preset), seed=0)
    mesh, mesh_base = start_mesh(model, args.threads, args.ctx, work / "state")
    server, server_base = start_llama_server(model, args.threads, args.ctx)
    try:
        ways = {
            "in-process": in_process_client(model, args.threads, args.ctx, raw=False),
            "in-process-raw": in_process_client(model, args.threads, args.ctx, raw=True),
            "mesh": http_client(mesh_base, MODEL_ID),
            "llama-server": http_client(server_base, MODEL_ID),
        }
        for run in ways.values():
            run("warm-up", 8)
        by_clients = {str(c): interleaved(ways, c, args) for c in (1, 4)}
    finally:
        stop_process(mesh)
        stop_process(server)
    results = {way: {c: by_clients[c][way] for c in by_clients} for way in ways}

    ratios = compare(results)
    path = write_result(
        "overhead",
        {
            "model": {
                "arch": "llama",
                "preset": args.preset,
                "parameters": _params(model),
                "weights": "random",
            },
            "config": vars(args),
            "results": results,
            "ratios": ratios,
        },
    )
    print_table(results, ratios)
    print(f"\nwritten to {path}")
    return 0


def compare(r: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in ("1", "4"):
        key = "decode_tps_p50" if c == "1" else "aggregate_tps"
        mesh, server = r["mesh"][c], r["llama-server"][c]
        # Compare with the stronger in-process baseline: the faster one, and the earlier first token.
        local = {
            key: max(r["in-process"][c][key], r["in-process-raw"][c][key]),
            "ttft_ms_p50": min(r["in-process"][c]["ttft_ms_p50"], r["in-process-raw"][c]["ttft_ms_p50"]),
        }
        out[c] = {
            "throughput_metric": key,
            "mesh_vs_in_process_throughput": round(mesh[key] / local[key], 3),
            "mesh_ttft_overhead_ms": round(mesh["ttft_ms_p50"] - local["ttft_ms_p50"], 2),
            "mesh_vs_llama_server_throughput": round(mesh[key] / server[key], 3),
            "mesh_vs_llama_server_ttft_p50": round(server["ttft_ms_p50"] / mesh["ttft_ms_p50"], 3),
        }
    out["targets"] = {
        "mesh_vs_in_process_throughput >= 0.97": all(
            out[c]["mesh_vs_in_process_throughput"] >= 0.97 for c in "14"
        ),
        "ttft_overhead_ms <= 10 (1 client)": out["1"]["mesh_ttft_overhead_ms"] <= 10,
        "mesh_vs_llama_server >= 1.0 (throughput and p50 TTFT)": all(
            out[c]["mesh_vs_llama_server_throughput"] >= 1.0
            and out[c]["mesh_vs_llama_server_ttft_p50"] >= 1.0
            for c in "14"
        ),
    }
    return out


def _params(model: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(str(model)).tensors)


def print_table(results: dict[str, dict[str, Any]], ratios: dict[str, Any]) -> None:
    print(f"\n{'way':<14}{'clients':>8}{'TTFT p50 ms':>13}{'decode tok/s p50':>18}{'aggregate tok/s':>17}")
    for way, by_clients in results.items():
        for c, m in by_clients.items():
            print(
                f"{way:<14}{c:>8}{m['ttft_ms_p50']:>13.1f}{m['decode_tps_p50']:>18.1f}{m['aggregate_tps']:>17.1f}"
            )
    print()
    for c in ("1", "4"):
        x = ratios[c]
        print(
            f"{c} client(s): mesh/in-process {x['throughput_metric']} "
            f"{x['mesh_vs_in_process_throughput']:.3f}, "
            f"TTFT overhead {x['mesh_ttft_overhead_ms']:+.1f} ms, mesh/llama-server throughput "
            f"{x['mesh_vs_llama_server_throughput']:.3f}, TTFT {x['mesh_vs_llama_server_ttft_p50']:.3f}"
        )
    for target, ok in ratios["targets"].items():
        print(f"  {'PASS' if ok else 'MISS'}  {target}")


if __name__ == "__main__":
    sys.exit(main())

"""Structured output's cost: decode speed with a JSON-schema grammar (and JSON mode, and a forced
tool call) against unconstrained decoding, through a real node's HTTP API, same model, one run.

A synthesized llama (24 x 1024, f16, random weights) with a 32,000-token vocabulary, as Llama 2
and Mistral have: llama.cpp's grammar sampler checks candidate tokens against the grammar, so its
cost grows with the vocabulary. The schema asks for an array of at least 100 small integers, so
that even random weights keep writing JSON for the whole `max_tokens`. Each way streams the same
prompts greedily, in interleaved rounds; decode speed is (tokens - 1) / (last token - first
token), the prompt's evaluation left out.

    python bench/api.py [--rounds 3] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.gguf import shape_for, synthesize
from bench._common import (
    free_port_pair,
    p50,
    print_targets,
    scratch_dir,
    stop_process,
    wait_http,
    write_result,
)

BIN = Path(sys.executable).parent
PROMPTS = ["List some numbers.", "Give me the values as JSON.", "the model node"]
SCHEMA = {
    "type": "object",
    "properties": {
        "values": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 99},
            "minItems": 100,
        }
    },
    "required": ["values"],
}
TOOL = {
    "type": "function",
    "function": {"name": "record", "parameters": SCHEMA},
}
WAYS: dict[str, dict[str, Any]] = {
    "unconstrained": {},
    "json_schema": {
        "response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": SCHEMA}}
    },
    "json_object": {"response_format": {"type": "json_object"}},
    "forced tool call": {"tools": [TOOL], "tool_choice": "required"},
}


def stream_once(
    url: str, model: str, prompt: str, extra: dict[str, Any], max_tokens: int
) -> dict[str, float]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    stamps: list[float] = []
    tokens = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["finish_reason"] is None:
                stamps.append(time.perf_counter())
    decode_s = stamps[-1] - stamps[0] if len(stamps) > 1 else float("nan")
    return {
        "tokens": tokens,
        "decode_s": decode_s,
        "tok_s": (tokens - 1) / decode_s if decode_s else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    work = scratch_dir("api-bench-")
    model = synthesize("llama", work / "api-bench.gguf", shape_for("llama", "300m", n_vocab=32000), seed=11)
    zmq_port, http_port = free_port_pair(), free_port_pair()
    url = f"http://127.0.0.1:{http_port}"
    argv = [
        str(BIN / "mesh-llm"), "serve", "--model", str(model), "--host", "127.0.0.1", "--no-mdns",
        "--http-port", str(http_port), "--zmq-port", str(zmq_port), "--threads", str(args.threads),
        "--slots", "1", "--state-dir", str(work / "state"),
    ]  # fmt: skip
    log = (work / "node.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    runs: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
    try:
        wait_http(f"{url}/health", proc)
        stream_once(url, "api-bench", "warm up", {}, 8)
        for _ in range(args.rounds):
            for prompt in PROMPTS:
                for way, extra in WAYS.items():
                    runs[way].append(stream_once(url, "api-bench", prompt, extra, args.max_tokens))
    finally:
        stop_process(proc)
        log.close()
        model.unlink()
    base = p50([r["tok_s"] for r in runs["unconstrained"]])
    results = {
        way: {
            "tok_s": round(p50([r["tok_s"] for r in rs]), 2),
            "ratio": round(p50([r["tok_s"] for r in rs]) / base, 3),
            "tokens": [int(r["tokens"]) for r in rs],
        }
        for way, rs in runs.items()
    }
    targets = {"JSON-schema decode >= 0.8x unconstrained": results["json_schema"]["ratio"] >= 0.8}
    setup = {
        "model": "llama 24 x 1024, vocab 32000, f16, random weights (synthesized)",
        "schema": SCHEMA,
        "prompts": len(PROMPTS),
        "greedy": True,
        "through": "HTTP streaming to a real mesh-llm serve (gunicorn, router, engine child)",
        **vars(args),
    }
    path = write_result("api", {"setup": setup, "results": results, "targets": targets})
    print(f"{'way':<20} {'tok/s':>8} {'ratio':>7}")
    for way, r in results.items():
        print(f"{way:<20} {r['tok_s']:>8.1f} {r['ratio']:>6.2f}x")
    print_targets(targets, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

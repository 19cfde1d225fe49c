"""Speculative decoding: decode speed with and without drafting, on synthesized target/draft pairs.

The pairs share one seed, so target and draft have the same embeddings, output head and first
layer; the target's other 23 layers have their output projections scaled by a small factor, so
they move its residual stream only a little. The scale sets how often the 1-layer draft's greedy
token is the target's: 0.005 gives a pair that agrees strongly, 0.04 one that agrees about half
the time. Target: 24 layers, 1024 wide, 8000-token vocabulary, f16 (~290M parameters, large
enough that decoding is memory-bound on a CPU, as with real models, so that verifying several
tokens in one batch costs little more than one). Random weights: the text is gibberish.

Each way runs the same code-like greedy prompts, in interleaved rounds, in the real engine (the
speculative-drafter actor next to the target): plain decoding, drafting with the adaptive
governor (as `mesh-llm serve --draft` runs), drafting forced on every step, and prompt lookup.

    python bench/speculative.py [--rounds 2] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import Finished, Generate, shape_for, synthesize
from actors._llama_engine import LlamaEngine
from actors._speculative import Governor
from bench._common import print_targets, write_result

PROMPTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n\ndef factorial(n):\n",
    "class Node:\n    def __init__(self, value, next=None):\n        self.value = value\n"
    "        self.next = next\n\n    def __repr__(self):\n",
    "import json\n\nwith open('config.json') as f:\n    config = json.load(f)\n\nfor key, value in config",
]
PAIRS = {"high_agreement": 0.005, "half_agreement": 0.04}


def run(engine: LlamaEngine, prompt: str, speculative: str, max_tokens: int) -> tuple[int, float, Finished]:
    request = Generate(
        request_id=f"r{time.monotonic_ns()}",
        model="m",
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        speculative=speculative,
    )
    started = time.perf_counter()
    engine.admit(request)
    done = None
    while engine.active:
        for event in engine.step():
            if isinstance(event, Finished):
                done = event
    assert done is not None
    return done.completion_tokens, time.perf_counter() - started, done


def measure_pair(target: Path, draft: Path, args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"n_ctx": 1024, "n_threads": args.threads, "slots": 1}
    engines = {
        "adaptive": LlamaEngine(str(target), draft=str(draft), speculative="draft", **kw),
        "forced": LlamaEngine(
            str(target), draft=str(draft), speculative="draft", governor=Governor(fixed=True), **kw
        ),
        "lookup": LlamaEngine(str(target), speculative="lookup", **kw),
    }
    ways = {  # way -> (engine, speculative mode of its requests)
        "plain": ("adaptive", "off"),
        "draft (adaptive)": ("adaptive", "draft"),
        "draft (forced)": ("forced", "draft"),
        "prompt lookup": ("lookup", "lookup"),
    }
    totals = {way: [0, 0.0, 0, 0] for way in ways}  # tokens, seconds, drafted, accepted
    try:
        for engine, mode in ways.values():  # warm-up: caches, and the governor's first measurements
            for prompt in PROMPTS:
                run(engines[engine], prompt, mode, args.max_tokens)
        for _ in range(args.rounds):
            for prompt in PROMPTS:
                for way, (engine, mode) in ways.items():
                    n, seconds, done = run(engines[engine], prompt, mode, args.max_tokens)
                    t = totals[way]
                    t[0] += n
                    t[1] += seconds
                    t[2] += done.drafted_tokens
                    t[3] += done.accepted_tokens
        governor = engines["adaptive"].governor.snapshot()
    finally:
        for engine in engines.values():
            engine.close()
    plain = totals["plain"][0] / totals["plain"][1]
    out: dict[str, Any] = {"ways": {}, "adaptive_governor": governor}
    for way, (tokens, seconds, drafted, accepted) in totals.items():
        tps = tokens / seconds
        out["ways"][way] = {
            "tok_s": round(tps, 2),
            "speedup": round(tps / plain, 3),
            "drafted_tokens": drafted,
            "accepted_tokens": accepted,
            "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="spec-bench-"))
    shape = shape_for("llama", "300m", n_vocab=8000)
    draft = synthesize(
        "llama", work / "draft.gguf", shape_for("llama", "300m", n_vocab=8000, n_layer=1), seed=7
    )
    results: dict[str, Any] = {}
    for name, scale in PAIRS.items():
        target = synthesize(
            "llama", work / f"target-{name}.gguf", shape, seed=7, quiet_from=1, quiet_scale=scale
        )
        results[name] = {"quiet_scale": scale, **measure_pair(target, draft, args)}
        target.unlink()
    high, half = results["high_agreement"]["ways"], results["half_agreement"]["ways"]
    targets = {
        "high agreement: draft speed-up >= 1.38x": high["draft (adaptive)"]["speedup"] >= 1.38,
        "half agreement: the adaptive drafter does not slow decoding (>= 0.95x)": (
            half["draft (adaptive)"]["speedup"] >= 0.95
        ),
    }
    setup = {
        "target": "llama 24 x 1024, vocab 8000, f16, random weights",
        "draft": "llama 1 x 1024, same seed (shares embeddings, head, layer 0)",
        "prompts": len(PROMPTS),
        "greedy": True,
        **vars(args),
    }
    path = write_result("speculative", {"setup": setup, "results": results, "targets": targets})
    print(f"{'pair':<16} {'way':<18} {'tok/s':>8} {'speed-up':>9} {'acceptance':>11}")
    for name, r in results.items():
        for way, w in r["ways"].items():
            rate = f"{w['acceptance_rate']:.2f}" if w["acceptance_rate"] is not None else "-"
            print(f"{name:<16} {way:<18} {w['tok_s']:>8.1f} {w['speedup']:>8.2f}x {rate:>11}")
        print(f"{'':<16} governor: {json.dumps(r['adaptive_governor'])}")
    print_targets(targets, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

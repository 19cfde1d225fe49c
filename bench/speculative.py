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
governor (as `mesh-llm serve --draft` runs), drafting forced on every step, and prompt lookup;
and, for comparison, llama-cpp-python's own `Llama.create_completion` plain, with its
`draft_model` hook backed by the same draft GGUF, and with its prompt-lookup drafter.

    python bench/speculative.py [--rounds 2] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import Finished, Generate
from actors.engine._llama import LlamaEngine
from actors.engine._speculative import Governor
from actors.gguf import shape_for, synthesize
from bench._common import print_targets, scratch_dir, write_result

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


class HookDraft:
    """llama-cpp-python's own `draft_model` hook backed by the same draft GGUF (greedy, `k` tokens,
    reusing its KV prefix): the hook the issue asked to measure against our verification loop."""

    def __init__(self, path: Path, k: int, n_threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=1024, n_threads=n_threads, verbose=False)
        self.k = k

    def __call__(self, input_ids: np.ndarray, /, **kwargs: Any) -> np.ndarray:
        llm, ids = self.llm, [int(t) for t in input_ids]
        have = list(llm.input_ids[: llm.n_tokens])
        keep = 0
        while keep < min(len(have), len(ids) - 1) and have[keep] == ids[keep]:
            keep += 1
        llm.n_tokens = keep
        llm.eval(ids[keep:])
        out = []
        for _ in range(self.k):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(out[-1:])
        return np.array(out, dtype=np.intc)


def hook_way(llm: Any) -> Callable[[str, int], tuple[int, float, int, int]]:
    def way(prompt: str, max_tokens: int) -> tuple[int, float, int, int]:
        started = time.perf_counter()
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0)
        return out["usage"]["completion_tokens"], time.perf_counter() - started, 0, 0

    return way


def engine_way(engine: LlamaEngine, mode: str) -> Callable[[str, int], tuple[int, float, int, int]]:
    def way(prompt: str, max_tokens: int) -> tuple[int, float, int, int]:
        n, seconds, done = run(engine, prompt, mode, max_tokens)
        return n, seconds, done.drafted_tokens, done.accepted_tokens

    return way


def measure_pair(target: Path, draft: Path, args: argparse.Namespace) -> dict[str, Any]:
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    kw: dict[str, Any] = {"n_ctx": 1024, "n_threads": args.threads, "slots": 1}
    adaptive = LlamaEngine(str(target), draft=str(draft), speculative="draft", **kw)
    forced = LlamaEngine(
        str(target), draft=str(draft), speculative="draft", governor=Governor(fixed=True), **kw
    )
    lookup = LlamaEngine(str(target), speculative="lookup", **kw)
    hook = {"model_path": str(target), "n_ctx": 1024, "n_threads": args.threads, "verbose": False}
    ways = {
        "plain": engine_way(adaptive, "off"),
        "draft (adaptive)": engine_way(adaptive, "draft"),
        "draft (forced)": engine_way(forced, "draft"),
        "prompt lookup": engine_way(lookup, "lookup"),
        "llama-cpp-python plain": hook_way(Llama(**hook)),
        "llama-cpp-python draft_model hook (k=6)": hook_way(
            Llama(**hook, draft_model=HookDraft(draft, 6, args.threads))
        ),
        "llama-cpp-python prompt lookup hook": hook_way(
            Llama(**hook, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10))
        ),
    }
    totals = {name: [0, 0.0, 0, 0] for name in ways}  # tokens, seconds, drafted, accepted
    try:
        for way in ways.values():  # warm-up: caches, and the governor's first measurements
            for prompt in PROMPTS:
                way(prompt, args.max_tokens)
        for _ in range(args.rounds):
            for prompt in PROMPTS:
                for name, way in ways.items():
                    for i, value in enumerate(way(prompt, args.max_tokens)):
                        totals[name][i] += value
        governor = adaptive.governor.snapshot()
    finally:
        for engine in (adaptive, forced, lookup):
            engine.close()
    plain = totals["plain"][0] / totals["plain"][1]
    out: dict[str, Any] = {"ways": {}, "adaptive_governor": governor}
    for name, (tokens, seconds, drafted, accepted) in totals.items():
        tps = tokens / seconds
        out["ways"][name] = {
            "tok_s": round(tps, 2),
            "speedup": round(tps / plain, 3),
            "drafted_tokens": int(drafted),
            "accepted_tokens": int(accepted),
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
    work = scratch_dir("spec-bench-")
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
    print(f"{'pair':<16} {'way':<40} {'tok/s':>8} {'speed-up':>9} {'acceptance':>11}")
    for name, r in results.items():
        for way, w in r["ways"].items():
            rate = f"{w['acceptance_rate']:.2f}" if w["acceptance_rate"] is not None else "-"
            print(f"{name:<16} {way:<40} {w['tok_s']:>8.1f} {w['speedup']:>8.2f}x {rate:>11}")
        print(f"{'':<16} governor: {json.dumps(r['adaptive_governor'])}")
    print_targets(targets, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

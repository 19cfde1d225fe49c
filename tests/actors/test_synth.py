"""Synthesized GGUFs load in real llama.cpp, tokenize, chat and generate."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from actors import Chunk, Finished, Generate, Started
from actors.engine._llama import LlamaEngine
from actors.gguf import ARCHS, shape_for, synthesize
from actors.gguf._synth import vocabulary
from tests.support.engines import run_all
from tests.support.nodes import BIN

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_loads_in_llama_cpp_and_chats(tmp_path: Path, arch: str, dtype: str) -> None:
    path = synthesize(arch, tmp_path / f"{arch}.gguf", shape_for(arch, "tiny"), dtype=dtype)
    engine = LlamaEngine(str(path), n_ctx=256, n_threads=1, slots=2)
    assert engine.model_id == arch and engine.n_params > 0
    request = Generate(
        request_id="r",
        model=arch,
        messages=[{"role": "user", "content": "hello mesh"}],
        max_tokens=6,
        temperature=0,
    )
    events = run_all(engine, [request])
    assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
    assert events[-1].completion_tokens == 6 and events[-1].finish_reason == "length"
    assert sum(e.n_tokens for e in events if isinstance(e, Chunk)) == 6
    # ChatML framing: special tokens are single tokens, and the template was applied.
    framed = engine.llm.tokenize(engine.render(request).encode(), add_bos=False, special=True)
    assert framed.count(3) == 2, "<|im_start|> twice: the user turn and the assistant prompt"


def test_the_vocabulary_has_the_requested_size_and_no_duplicates() -> None:
    for n in (400, 8000, 32000):
        tokens, scores, types = vocabulary(n)
        assert len(tokens) == len(set(tokens)) == len(scores) == len(types) == n


def test_mesh_ctl_synth_writes_a_model_and_refuses_impossible_shapes(tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    ok = subprocess.run(
        [str(BIN / "mesh-ctl"), "model", "synth", "--arch", "llama", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and out.exists() and "RANDOM WEIGHTS" in ok.stdout
    bad = subprocess.run(
        [
            str(BIN / "mesh-ctl"),
            "model",
            "synth",
            "--arch",
            "llama",
            "--heads",
            "5",
            "--out",
            str(tmp_path / "x.gguf"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "n_head" in bad.stderr and not (tmp_path / "x.gguf").exists()

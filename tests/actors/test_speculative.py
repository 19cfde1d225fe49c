"""Speculative decoding: prompt lookup, the draft-length and governor policies, the drafter actor
next to a real target, and the HTTP API (greedy output unchanged, usage and status counts)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from actors import Finished, Generate, InvalidRequest
from actors.engine._drafter import draft_threads
from actors.engine._llama import LlamaEngine
from actors.engine._speculative import DraftLength, Governor, NgramIndex
from actors.gguf import shape_for, synthesize
from tests.support.engines import run_all, texts
from tests.support.nodes import BIN, NodeProcess, start_node

# A target of 4 layers whose last 3 barely move the residual stream, and its 1-layer draft.
SHAPE = shape_for("llama", "tiny", n_vocab=1024, n_embd=64, n_layer=4)


def test_prompt_lookup_proposes_what_followed_the_last_match_of_the_suffix() -> None:
    index = NgramIndex([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2])
    assert index.propose(3) == [3, 7, 8], "the latest match of the longest suffix wins"
    index.add(3)
    assert index.propose(2) == [7, 8]
    assert NgramIndex([4, 5, 6]).propose(4) == [], "no earlier occurrence: nothing to propose"


def test_the_draft_length_grows_while_accepted_and_shrinks_on_early_rejections() -> None:
    length = DraftLength(k=4, k_max=6)
    for _ in range(5):
        length.update(length.k, length.k)
    assert length.k == 6
    length.update(6, 0)
    assert length.k == 3
    length.update(3, 0)
    length.update(2, 0)
    assert length.k == 1


def test_the_governor_turns_drafting_down_when_plain_decoding_is_faster() -> None:
    governor = Governor(probe_steps=4, hold_steps=8)
    for _ in range(200):
        # drafting: 2 tokens in 30 ms; plain: 1 token in 10 ms
        governor.record(*((2, 0.030) if governor.drafting else (1, 0.010)), sequences=1)
    assert governor.mode == "plain" and governor.held == "plain"
    assert governor.rates["plain"] == pytest.approx(100) and governor.rates["spec"] == pytest.approx(
        66.7, 0.01
    )
    steps_drafting = 0
    for _ in range(1000):
        steps_drafting += governor.drafting
        governor.record(*((2, 0.030) if governor.drafting else (1, 0.010)), sequences=1)
    assert steps_drafting < 60, "re-measuring a drafter that does not pay stays rare"


def test_the_governor_keeps_drafting_when_it_pays() -> None:
    governor = Governor(probe_steps=4, hold_steps=8)
    steps_plain = 0
    for _ in range(1000):
        steps_plain += not governor.drafting
        governor.record(*((4, 0.020) if governor.drafting else (1, 0.010)), sequences=1)
    assert governor.held == "spec" and steps_plain < 60


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(target, draft): one seed, so they share embeddings, head and first layer."""
    root = tmp_path_factory.mktemp("pair")
    target = synthesize("llama", root / "target.gguf", SHAPE, seed=3, quiet_from=1, quiet_scale=0.05)
    draft = synthesize("llama", root / "draft.gguf", shape_for("llama", "tiny", n_layer=1), seed=3)
    return target, draft


def greedy(rid: str, prompt: str, speculative: str = "", n: int = 48) -> Generate:
    return Generate(
        request_id=rid, model="m", prompt=prompt, max_tokens=n, temperature=0, speculative=speculative
    )


PROMPTS = ["def add(a, b):\n    return", "the mesh of nodes", "import node\nclass Mesh:", "x"]


@pytest.mark.slow
def test_greedy_output_is_identical_with_a_draft_model_with_prompt_lookup_and_without(
    pair: tuple[Path, Path],
) -> None:
    target, draft = pair
    always = Governor(fixed=True)  # draft on every step, whether or not it pays on this tiny model
    engine = LlamaEngine(
        str(target), n_ctx=512, n_threads=1, slots=2, draft=str(draft), speculative="draft", governor=always
    )
    try:
        for mode in ("off", "draft", "lookup"):
            # two at a time: drafted and plain sequences share each decode (continuous batching)
            events = run_all(engine, [greedy(f"{mode}{i}", p, mode) for i, p in enumerate(PROMPTS)][:2])
            events += run_all(engine, [greedy(f"{mode}{i + 2}", p, mode) for i, p in enumerate(PROMPTS[2:])])
            got = texts(events)
            if mode == "off":
                plain = {rid[3:]: text for rid, text in got.items()}
            else:
                assert {rid[len(mode) :]: text for rid, text in got.items()} == plain, mode
            done = [e for e in events if isinstance(e, Finished)]
            assert all(e.completion_tokens == 48 for e in done)
            if mode == "draft":
                assert all(e.drafter == "draft" and e.drafted_tokens > 0 for e in done)
                assert sum(e.accepted_tokens for e in done) > 0.5 * sum(e.drafted_tokens for e in done)
        stats = engine.stats()
        assert stats["drafted_tokens"] and stats["accepted_tokens"]
    finally:
        engine.close()


def test_a_draft_model_takes_the_cpus_the_target_leaves_or_one_thread() -> None:
    assert draft_threads(2, cpus=2) == 1, "two teams on two CPUs throttle both models' decodes"
    assert draft_threads(4, cpus=6) == 2
    assert draft_threads(2, cpus=8) == 2, "never more than the target's"
    assert draft_threads(8, cpus=4) == 1


@pytest.mark.slow
def test_drafting_next_to_a_target_on_every_cpu_starts_no_openmp_team(pair: tuple[Path, Path]) -> None:
    """A second OpenMP team in the engine's process would make every decode slower (see
    `draft_threads`); libgomp starts a team's workers as threads of the process, so count them."""
    cpus = len(os.sched_getaffinity(0))
    engine = LlamaEngine(
        str(pair[0]), n_ctx=256, n_threads=cpus, slots=1, draft=str(pair[1]), speculative="draft",
        governor=Governor(fixed=True),
    )  # fmt: skip
    try:
        run_all(engine, [greedy("plain", PROMPTS[0], "off")])  # the target's team is up
        before = len(os.listdir("/proc/self/task"))
        done = run_all(engine, [greedy("drafted", PROMPTS[1], "draft")])[-1]
        assert isinstance(done, Finished) and done.drafted_tokens > 0
        assert len(os.listdir("/proc/self/task")) == before
    finally:
        engine.close()


@pytest.mark.slow
def test_sampled_requests_decode_plainly_and_a_missing_draft_model_is_a_clear_error(
    pair: tuple[Path, Path],
) -> None:
    engine = LlamaEngine(str(pair[0]), n_ctx=256, n_threads=1, slots=1, speculative="lookup")
    sampled = Generate(request_id="s", model="m", prompt="hi", max_tokens=8, temperature=0.8, seed=1)
    done = run_all(engine, [sampled])[-1]
    assert isinstance(done, Finished) and done.drafter == "" and done.drafted_tokens == 0
    with pytest.raises(InvalidRequest, match="no draft model"):
        engine.admit(greedy("d", "hi", "draft"))
    assert engine.active == 0  # the refusal took no slot: the next request is served
    assert isinstance(run_all(engine, [greedy("next", "hi", "off")])[-1], Finished)


@pytest.mark.slow
def test_a_draft_model_with_another_vocabulary_is_refused(pair: tuple[Path, Path], tmp_path: Path) -> None:
    other = synthesize("llama", tmp_path / "other.gguf", shape_for("llama", "tiny", n_vocab=900), seed=3)
    with pytest.raises(ValueError, match="vocabulary has 900 tokens"):
        LlamaEngine(str(pair[0]), n_ctx=256, n_threads=1, draft=str(other), speculative="draft")
    refused = subprocess.run(
        [str(BIN / "mesh-llm"), "serve", "--model", str(pair[0]), "--draft", str(other), "--no-mdns"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "vocabulary of 900 tokens" in refused.stderr and "tokenizer" in refused.stderr


@pytest.fixture(scope="module")
def drafting_node(pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    node = start_node(tmp_path_factory.mktemp("spec"), pair[0], "--draft", str(pair[1]), "--no-mdns")
    yield node
    node.stop()


@pytest.mark.slow
@pytest.mark.e2e
def test_greedy_output_through_the_api_is_identical_with_and_without_drafting(
    drafting_node: NodeProcess,
) -> None:
    def complete(speculative: str, prompt: str) -> dict:
        body = {"model": "target", "prompt": prompt, "max_tokens": 64, "temperature": 0}
        r = httpx.post(
            f"{drafting_node.url}/v1/completions", json={**body, "speculative": speculative}, timeout=60
        )
        assert r.status_code == 200, r.text
        return r.json()

    for prompt in PROMPTS[:3]:
        plain, drafted = complete("off", prompt), complete("", prompt)
        assert drafted["choices"][0]["text"] == plain["choices"][0]["text"]
        assert "speculative" not in plain["usage"]
        spec = drafted["usage"]["speculative"]
        assert spec["drafter"] == "draft" and spec["drafted_tokens"] > 0
        assert spec["acceptance_rate"] == pytest.approx(
            spec["accepted_tokens"] / spec["drafted_tokens"], abs=1e-3
        )
    bad = httpx.post(
        f"{drafting_node.url}/v1/completions",
        json={"model": "target", "prompt": "x", "speculative": "psychic"},
        timeout=30,
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "speculative"
    status = drafting_node.status()["speculative"]
    assert status["drafted_tokens"] > 0 and 0 < status["acceptance_rate"] <= 1
    assert f"drafting {status['drafted_tokens']} tokens drafted" in drafting_node.ctl("status").stdout


def test_a_malformed_draft_request_row_is_a_protocol_error_not_a_crash() -> None:
    from actors import ProtocolError
    from actors.engine._drafter import _checked

    assert _checked([1, 3, [5, 6], 4], slots=2) == (1, 3, [5, 6], 4)
    for row in ([9, 0, [], 1], [0, -1, [], 1], [0, 0, ["x"], 1], [0, 0, 5, 1], "garbage", [0, 0]):
        with pytest.raises(ProtocolError):
            _checked(row, slots=2)

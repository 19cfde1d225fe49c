"""The llama.cpp engine's continuous batching, on a real (synthesized) model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from actors import Chunk, ContextOverflow, Finished, Generate, InvalidRequest
from actors.engine import EngineEvent
from actors.engine._batching import DecodePlanner
from actors.engine._llama import SHARED_PREFILL_TOKENS, LlamaEngine
from actors.engine._llamacpp import logits_reader
from actors.gguf import shape_for, synthesize
from tests.support.engines import run_all, texts

pytestmark = pytest.mark.slow


def greedy(rid: str, prompt: str, n: int = 24) -> Generate:
    return Generate(request_id=rid, model="m", prompt=prompt, max_tokens=n, temperature=0)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> LlamaEngine:
    path = synthesize("llama", tmp_path_factory.mktemp("m") / "m.gguf", shape_for("llama", "tiny"), seed=5)
    return LlamaEngine(str(path), n_ctx=256, n_threads=1, slots=3)


def test_greedy_text_is_the_same_alone_and_batched_with_others(engine: LlamaEngine) -> None:
    alone = texts(run_all(engine, [greedy("a", "the model node")]))["a"]
    batched = run_all(
        engine, [greedy("a", "the model node"), greedy("b", "x y"), greedy("c", "hello mesh", 10)]
    )
    assert texts(batched)["a"] == alone
    done = {e.request_id: e for e in batched if isinstance(e, Finished)}
    assert {rid: d.completion_tokens for rid, d in done.items()} == {"a": 24, "b": 24, "c": 10}


def test_a_prompt_extending_a_cached_one_gives_the_same_text_as_from_scratch(engine: LlamaEngine) -> None:
    run_all(engine, [greedy("t1", "the model node mesh", 4)])
    extended = texts(run_all(engine, [greedy("t2", "the model node mesh token layer")]))["t2"]
    fresh = LlamaEngine(engine.llm.model_path, n_ctx=256, n_threads=1, slots=1)
    assert texts(run_all(fresh, [greedy("t3", "the model node mesh token layer")]))["t3"] == extended


def test_a_seed_fixes_a_sample(engine: LlamaEngine) -> None:
    def sample() -> str:
        request = Generate(request_id="s", model="m", prompt="hi", max_tokens=12, temperature=1.0, seed=11)
        return texts(run_all(engine, [request]))["s"]

    assert sample() == sample()


def test_a_cancelled_request_frees_its_slot_and_the_others_go_on(engine: LlamaEngine) -> None:
    for request in (greedy("keep", "a b"), greedy("drop", "c d", 200)):
        engine.admit(request)
    engine.step()
    assert engine.cancel("drop") and not engine.cancel("drop")
    events: list[EngineEvent] = []
    while engine.active:
        events += engine.step()
    assert {e.request_id for e in events} == {"keep"}


def test_a_full_engine_and_an_oversized_prompt_are_refused(engine: LlamaEngine) -> None:
    with pytest.raises(ContextOverflow):
        engine.admit(greedy("big", "word " * 300))
    for i in range(3):
        engine.admit(greedy(f"f{i}", "x"))
    with pytest.raises(Exception, match="slots are busy"):
        engine.admit(greedy("one-more", "x"))
    for i in range(3):
        engine.cancel(f"f{i}")
    assert engine.active == 0


def test_synthesized_models_run_to_max_tokens_under_greedy(engine: LlamaEngine, tmp_path: Path) -> None:
    done = [e for e in run_all(engine, [greedy("long", "x", 200)]) if isinstance(e, Finished)]
    assert done[0].finish_reason == "length" and done[0].completion_tokens == 200


def test_a_resumed_request_continues_from_the_generated_token_ids_exactly(engine: LlamaEngine) -> None:
    """Failover resumes from token ids, not re-tokenized text: the rest is what the uninterrupted
    run would have produced."""
    events = run_all(engine, [greedy("whole", "the node", 40)])
    ids = [t for e in events if isinstance(e, Chunk) for t in e.tokens]
    assert len(ids) == 40
    resumed = Generate(
        request_id="rest", model="m", prompt="the node", max_tokens=25, temperature=0, resume_tokens=ids[:15]
    )
    rest = run_all(engine, [resumed])
    assert [t for e in rest if isinstance(e, Chunk) for t in e.tokens] == ids[15:]
    assert texts(events)["whole"].endswith(texts(rest)["rest"])


def test_a_prompt_of_no_tokens_on_a_model_without_bos_is_refused_and_holds_no_slot(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Wave 1: `"prompt": ""` on a tokenizer that adds no BOS (the Qwen2 family) held its slot
    forever; four of them hung the node."""
    path = synthesize(
        "llama", tmp_path_factory.mktemp("nobos") / "nobos.gguf", shape_for("llama", "tiny"), add_bos=False
    )
    engine = LlamaEngine(str(path), n_ctx=128, n_threads=1, slots=2)
    for i in range(4):
        with pytest.raises(InvalidRequest, match="empty"):
            engine.admit(greedy(f"empty{i}", ""))
    assert engine.active == 0
    assert texts(run_all(engine, [greedy("ok", "hello", 4)]))["ok"]


def test_a_huge_prompt_is_refused_before_it_is_tokenized(engine: LlamaEngine) -> None:
    with pytest.raises(ContextOverflow, match="bytes"):
        engine.admit(greedy("huge", "x" * (4 * 1024 * 1024)))
    assert engine.active == 0


def test_a_resumed_greedy_request_continues_exactly_on_a_fresh_engine(
    engine: LlamaEngine, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A failover resumes on another engine from the token ids the client has: those are fed one
    per step (as when they were generated), not as one batch whose rounding would differ."""
    path = synthesize("llama", tmp_path_factory.mktemp("r") / "r.gguf", shape_for("llama", "small"), seed=5)
    first = LlamaEngine(str(path), n_ctx=1024, n_threads=1, slots=1)
    events = run_all(first, [greedy("whole", "Once upon a time", 400)])
    ids = [t for e in events if isinstance(e, Chunk) for t in e.tokens]
    for cut in (60, 200, 300):
        fresh = LlamaEngine(str(path), n_ctx=1024, n_threads=1, slots=1)  # nothing cached
        request = Generate(
            request_id="rest", model="m", prompt="Once upon a time", max_tokens=400 - cut,
            temperature=0, resume_tokens=ids[:cut],
        )  # fmt: skip
        rest = [t for e in run_all(fresh, [request]) if isinstance(e, Chunk) for t in e.tokens]
        assert rest == ids[cut:], f"the text diverged after a resume at token {cut}"


def tokens_of(events: list[EngineEvent]) -> list[int]:
    return [t for e in events if isinstance(e, Chunk) for t in e.tokens]


def test_penalties_break_the_repetition_greedy_decoding_falls_into(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The random-weight model repeats itself greedily; frequency, presence and repeat penalties
    each change that (on the text so far), and the same penalised request gives the same text."""
    path = synthesize("llama", tmp_path_factory.mktemp("p") / "p.gguf", shape_for("llama", "small"), seed=5)
    engine = LlamaEngine(str(path), n_ctx=512, n_threads=1, slots=2)
    plain = tokens_of(run_all(engine, [greedy("plain", "Once upon a time", 80)]))
    assert len(set(plain)) < len(plain) / 2  # it does repeat itself
    for i, penalty in enumerate(
        ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repeat_penalty": 1.5})
    ):
        request = Generate(
            request_id=f"p{i}", model="m", prompt="Once upon a time", max_tokens=80, temperature=0, **penalty
        )  # type: ignore[arg-type]
        penalised = tokens_of(run_all(engine, [request]))
        assert penalised != plain and len(set(penalised)) > len(set(plain)), penalty
        again = tokens_of(run_all(engine, [dataclasses.replace(request, request_id=f"q{i}")]))
        assert again == penalised


def test_logit_bias_forces_or_forbids_tokens(engine: LlamaEngine) -> None:
    plain = tokens_of(run_all(engine, [greedy("plain", "the model node", 12)]))
    forced = Generate(
        request_id="forced", model="m", prompt="the model node", max_tokens=12, temperature=0,
        logit_bias={"7": 100.0},
    )  # fmt: skip
    assert tokens_of(run_all(engine, [forced])) == [7] * 12
    banned = Generate(
        request_id="banned", model="m", prompt="the model node", max_tokens=12, temperature=0,
        logit_bias={str(t): -100.0 for t in set(plain)},
    )  # fmt: skip
    assert not set(tokens_of(run_all(engine, [banned]))) & set(plain)


def test_a_bias_on_a_token_the_model_lacks_is_refused_and_leaves_no_slot_taken(engine: LlamaEngine) -> None:
    bad = Generate(request_id="bad", model="m", prompt="x", max_tokens=4, logit_bias={"99999999": 1.0})
    with pytest.raises(InvalidRequest, match="logit_bias"):
        engine.admit(bad)
    assert engine.active == 0
    assert texts(run_all(engine, [greedy("after", "x", 4)]))["after"]


def test_top_k_one_and_min_p_one_sample_the_greedy_token(engine: LlamaEngine) -> None:
    plain = tokens_of(run_all(engine, [greedy("plain", "the model node", 16)]))
    for i, narrow in enumerate(({"top_k": 1}, {"min_p": 1.0})):
        request = Generate(
            request_id=f"n{i}",
            model="m",
            prompt="the model node",
            max_tokens=16,
            temperature=1.5,
            seed=i,
            **narrow,
        )  # type: ignore[arg-type]
        assert tokens_of(run_all(engine, [request])) == plain, narrow
    wide = Generate(
        request_id="w", model="m", prompt="the model node", max_tokens=16, temperature=1.5, seed=1
    )
    assert tokens_of(run_all(engine, [wide])) != plain  # the control: sampling does wander


SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "mood": {"type": "string", "enum": ["calm", "busy"]}},
    "required": ["ok", "mood"],
    "additionalProperties": False,
}


def test_a_json_schema_makes_even_random_weights_answer_valid_json(engine: LlamaEngine) -> None:
    import json

    for i, temperature in enumerate((0.0, 1.0)):
        request = Generate(
            request_id=f"j{i}", model="m", prompt="answer:", max_tokens=64, temperature=temperature, seed=i,
            response_format={"type": "json_schema", "schema": SCHEMA},
        )  # fmt: skip
        events = run_all(engine, [request])
        answer = json.loads(texts(events)[f"j{i}"])
        assert (
            set(answer) == {"ok", "mood"}
            and isinstance(answer["ok"], bool)
            and answer["mood"] in ("calm", "busy")
        )
        done = events[-1]
        assert isinstance(done, Finished) and done.finish_reason == "stop"
    plain = texts(run_all(engine, [greedy("free", "answer:", 16)]))["free"]
    assert not plain.lstrip().startswith("{")  # the control: unconstrained, it writes no JSON


def test_json_object_mode_starts_an_object_and_a_schema_without_a_grammar_is_refused(
    engine: LlamaEngine,
) -> None:
    request = Generate(
        request_id="o",
        model="m",
        prompt="x",
        max_tokens=8,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert texts(run_all(engine, [request]))["o"].lstrip().startswith("{")
    dangling = {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}
    bad = Generate(
        request_id="bad", model="m", prompt="x", max_tokens=8,
        response_format={"type": "json_schema", "schema": dangling},
    )  # fmt: skip
    with pytest.raises(InvalidRequest, match="response_format"):
        engine.admit(bad)
    assert engine.active == 0


def test_a_resumed_structured_request_continues_within_its_grammar(engine: LlamaEngine) -> None:
    """After a failover the grammar state is rebuilt from the tokens already generated."""
    import json

    request = Generate(
        request_id="s", model="m", prompt="answer:", max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "schema": SCHEMA},
    )  # fmt: skip
    whole = tokens_of(run_all(engine, [request]))
    for cut in (1, 3, len(whole) // 2):
        resumed = dataclasses.replace(
            request, request_id=f"s{cut}", resume_tokens=whole[:cut], max_tokens=64 - cut
        )
        rest = tokens_of(run_all(engine, [resumed]))
        assert whole[:cut] + rest == whole, cut
    json.loads(engine.llm.detokenize(whole).decode())


def test_a_last_assistant_message_is_continued_not_closed(engine: LlamaEngine) -> None:
    """Prefill: the reply continues the assistant's words, exactly as a completion of the rendered
    conversation followed by those words would."""
    messages = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "My answer is"},
    ]
    rendered = engine.render(Generate(request_id="r", model="m", messages=messages[:1]))
    assert rendered.endswith("assistant\n")  # the template opens the reply turn
    chat = Generate(request_id="c", model="m", messages=messages, max_tokens=12, temperature=0)
    assert engine.render(chat) == rendered + "My answer is"
    completion = greedy("p", rendered + "My answer is", 12)
    assert texts(run_all(engine, [chat]))["c"] == texts(run_all(engine, [completion]))["p"]


def test_an_embedding_is_a_unit_vector_and_leaves_generation_as_it_was(engine: LlamaEngine) -> None:
    import numpy as np

    before = texts(run_all(engine, [greedy("g1", "the model node", 12)]))["g1"]

    def embed(rid: str, text: str) -> np.ndarray:
        events = run_all(engine, [Generate(request_id=rid, model="m", prompt=text, embed=True)])
        done = events[-1]
        assert isinstance(done, Finished) and done.completion_tokens == 0 and done.prompt_tokens > 1
        return np.array(done.embedding)

    long_text = " ".join(["memory layer"] * 15)  # more tokens than one embedding batch
    a, b, c, d = (
        embed("e1", "the model node"),
        embed("e2", "the model node"),
        embed("e3", "while"),
        embed("e4", long_text),
    )
    assert abs(np.linalg.norm(a) - 1) < 1e-6 and abs(np.linalg.norm(d) - 1) < 1e-6
    assert a @ b > 0.99999 and a @ c < 0.999
    assert engine.active == 0
    after = texts(run_all(engine, [greedy("g2", "the model node", 12)]))["g2"]
    assert after == before


def test_a_grammar_s_shortlist_finds_the_token_a_full_check_finds(
    engine: LlamaEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy structured output checks the likeliest tokens against the grammar first: its text
    is the one checking every token gives (a shortlist of one sends nearly every step there)."""
    import actors.engine._llama as llama_module

    def run(rid: str) -> str:
        request = Generate(
            request_id=rid, model="m", prompt="numbers:", max_tokens=48, temperature=0,
            response_format={"type": "json_object"},
        )  # fmt: skip
        return texts(run_all(engine, [request]))[rid]

    shortlisted = run("short")
    monkeypatch.setattr(llama_module, "GRAMMAR_SHORTLISTS", (1,))
    assert run("full") == shortlisted and shortlisted.lstrip().startswith("{")


def sampled_by(engine: LlamaEngine) -> list[str]:
    """The requests that drew a token in one step of `engine` (whether it made text or not)."""

    def done() -> dict[str, int]:
        return {s.request.request_id: s.n_done for s in engine._slots if s.request is not None}

    before = done()
    ended = {e.request_id for e in engine.step() if isinstance(e, Finished)}
    after = done()
    return sorted(rid for rid in before if rid in ended or after.get(rid, 0) > before[rid])


def test_prompts_and_generating_sequences_take_turns_and_prompts_share_a_step_while_they_fit(
    engine: LlamaEngine,
) -> None:
    def prompt(word: str, n_tokens: int) -> str:  # these words are a token each; a BOS comes first
        text = " ".join([word] * (n_tokens - 1))
        assert len(engine.llm.tokenize(text.encode(), add_bos=True, special=True)) == n_tokens
        return text

    half = SHARED_PREFILL_TOKENS // 2
    # Two halves fit one step; the third waits while the first two generate, then gets its turn
    # (the first two wait), then all three generate together.
    for rid, word in (("first", "a"), ("second", "x"), ("third", "the")):
        engine.admit(greedy(rid, prompt(word, half), 3))
    heard = []
    while engine.active:
        heard.append(sampled_by(engine))
    assert heard[:4] == [["first", "second"], ["first", "second"], ["third"], ["first", "second", "third"]]

    # A prompt that does not fit after the first waits, and so do those after it, short or not.
    # (Words no cached prompt starts with: only a shared BOS is not evaluated again.)
    engine.admit(greedy("first", prompt("and", half), 3))
    engine.admit(greedy("long", prompt("of", half + 4), 3))
    engine.admit(greedy("short", prompt("1", 3), 3))
    heard = []
    while engine.active:
        heard.append(sampled_by(engine))
    assert heard[:3] == [["first"], ["first"], ["long", "short"]]


def test_generating_sequences_split_into_decodes_as_measured_cheaper_and_each_gets_its_lone_text(
    engine: LlamaEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = [greedy("a", "the model node"), greedy("b", "x y mesh"), greedy("c", "hello mesh", 10)]
    alone = {r.request_id: texts(run_all(engine, [r]))[r.request_id] for r in requests}
    lib = engine._lib
    decode, widths = lib.llama_decode, []

    def counting(ctx: object, batch: object) -> int:
        widths.append(batch.n_tokens)  # type: ignore[attr-defined]
        return int(decode(ctx, batch))

    monkeypatch.setattr(lib, "llama_decode", counting)
    # As measured on a machine where one-token decodes are cheap and wider ones are not.
    monkeypatch.setattr(engine, "planner", DecodePlanner(costs={1: 0.010, 2: 0.032, 3: 0.040}))
    split = run_all(engine, requests)
    # Generating, the three went one per decode; a batch of one token per sequence decodes each
    # sequence exactly as it decodes alone, so each text is the one it gets alone.
    assert texts(split) == alone
    assert 3 not in widths and widths.count(1) >= 3 * 9
    # Measured the other way round, they go together again.
    widths.clear()
    monkeypatch.setattr(engine, "planner", DecodePlanner(costs={1: 0.010, 2: 0.012, 3: 0.013}))
    run_all(engine, requests)
    assert widths.count(3) >= 9


def test_the_greedy_shortcut_draws_what_llama_cpp_s_greedy_sampler_draws(engine: LlamaEngine) -> None:
    plain = texts(run_all(engine, [greedy("p", "the mesh layer node", 32)]))["p"]
    # Asking for logprobs keeps the request on llama.cpp's sampler chain.
    sampled = dataclasses.replace(greedy("s", "the mesh layer node", 32), logprobs=0)
    assert texts(run_all(engine, [sampled]))["s"] == plain


def test_the_logits_read_for_a_token_are_llama_cpps_own(engine: LlamaEngine) -> None:
    """`logits_reader` reads llama.cpp's buffer itself: its argmax is the token llama.cpp's own
    greedy sampler draws there, and a token whose logits were not output is refused, not read."""
    import llama_cpp

    engine.admit(greedy("lg", "a prompt no other test sends", 4))  # nothing cached
    engine.step()  # the prompt: only its last token's logits are output (index -1: the last)
    read = logits_reader(llama_cpp, engine.llm.n_vocab())
    chain = llama_cpp.llama_sampler_init_greedy()
    try:
        logits = read(engine._ctx, -1)
        assert logits.shape == (engine.llm.n_vocab(),) and logits.std() > 0
        assert int(logits.argmax()) == llama_cpp.llama_sampler_sample(chain, engine._ctx, -1)
        with pytest.raises(RuntimeError, match="no logits for batch token 0"):
            read(engine._ctx, 0)  # the prompt's first token: not output
    finally:
        llama_cpp.llama_sampler_free(chain)
        engine.cancel("lg")

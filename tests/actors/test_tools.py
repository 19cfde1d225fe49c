"""Tool calling across the call syntaxes of the model families: the engine renders tools through
each template (or the fallback), forces a call by grammar in the model's own syntax, and the
gateway's parser reads it back. Random weights: only the grammar makes the calls come out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actors import Generate, InvalidRequest, Started
from actors.engine._llama import LlamaEngine
from actors.engine._tools import grammar_schema, tool_syntax
from actors.gguf import shape_for, synthesize
from gateway.http._tools import CallParser
from tests.support.engines import run_all, texts

pytestmark = pytest.mark.slow

PLAIN_CHATML = (  # knows no tools: the engine describes them in the system message
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (  # the shape of Llama 3.1's: tools in the user turn, calls as {"name", "parameters"}
    "{% for m in messages %}{% if m['role'] == 'tool' %}"
    "{{ '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}"
    "{% elif m['tool_calls'] %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n<|python_tag|>'"
    " + (m['tool_calls'][0]['function'] | tojson) + '<|eom_id|>' }}{% else %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}"
    "{% endif %}{% endfor %}{% if tools %}{{ '<|start_header_id|>user<|end_header_id|>\\n\\n"
    'Respond with a JSON {\\"name\\": function name, \\"parameters\\": its arguments} for one of: \''
    " + (tools | tojson) + '<|eot_id|>' }}{% endif %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL = (  # the shape of Mistral v3's: [AVAILABLE_TOOLS], calls after [TOOL_CALLS]
    "{% if tools %}{{ '[AVAILABLE_TOOLS]' + (tools | tojson) + '[/AVAILABLE_TOOLS]' }}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST]' + m['content'] + '[/INST]' }}"
    "{% elif m['tool_calls'] %}{{ '[TOOL_CALLS]' + (m['tool_calls'] | tojson) + eos_token }}"
    "{% elif m['role'] == 'tool' %}{{ '[TOOL_RESULTS]' + m['content'] + '[/TOOL_RESULTS]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)
ALARM = {
    "type": "function",
    "function": {
        "name": "set_alarm",
        "parameters": {
            "type": "object",
            "properties": {
                "hour": {"type": "integer", "minimum": 0, "maximum": 23},
                "label": {"type": "string", "enum": ["work", "gym"]},
            },
            "required": ["hour", "label"],
        },
    },
}
NOTE = {
    "type": "function",
    "function": {
        "name": "take_note",
        "parameters": {"type": "object", "properties": {"ok": {"type": "boolean"}}},
    },
}


def engine_with(template: str | None, tmp: Path) -> LlamaEngine:
    kw = {"chat_template": template} if template else {}
    path = synthesize("llama", tmp / "m.gguf", shape_for("llama", "tiny"), seed=3, **kw)  # type: ignore[arg-type]
    return LlamaEngine(str(path), n_ctx=1024, n_threads=1, slots=1)


@pytest.mark.parametrize(
    ("template", "syntax"),
    [(None, "hermes"), (PLAIN_CHATML, "hermes"), (LLAMA3, "llama3"), (MISTRAL, "mistral")],
)
def test_a_forced_call_comes_out_in_the_model_s_syntax_and_parses(
    template: str | None, syntax: str, tmp_path: Path
) -> None:
    engine = engine_with(template, tmp_path)
    assert engine.tool_syntax == syntax
    messages = [{"role": "user", "content": "Wake me at seven for work."}]
    for i, choice in enumerate(("required", "function:set_alarm")):
        request = Generate(
            request_id=f"r{i}", model="m", messages=messages, tools=[NOTE, ALARM], tool_choice=choice,
            max_tokens=200, temperature=0.8, seed=i,
        )  # fmt: skip
        rendered = engine.render(request)
        assert "set_alarm" in rendered and "take_note" in rendered  # the tools reach the prompt
        events = run_all(engine, [request])
        started = next(e for e in events if isinstance(e, Started))
        assert started.tool_syntax == syntax
        parser = CallParser(syntax)
        found = parser.feed(texts(events)[f"r{i}"])
        content = found.content + parser.finish().content
        assert len(parser.calls) == 1 and not content.strip(), texts(events)
        call = parser.calls[0]
        arguments = json.loads(call.arguments)
        if choice != "required" or call.name == "set_alarm":
            assert (
                call.name == "set_alarm"
                and 0 <= arguments["hour"] <= 23
                and arguments["label"] in ("work", "gym")
            )
        else:
            assert call.name == "take_note" and set(arguments) <= {"ok"}


def test_the_fallback_describes_the_tools_and_turns_earlier_calls_into_text(tmp_path: Path) -> None:
    engine = engine_with(PLAIN_CHATML, tmp_path)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Alarm?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "set_alarm", "arguments": '{"hour": 7}'}},
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": "set"},
    ]  # fmt: skip
    text = engine.render(Generate(request_id="x", model="m", messages=messages, tools=[ALARM]))
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools") and '"name": "set_alarm"' in text
    assert '<tool_call>\n{"name": "set_alarm", "arguments": {"hour": 7}}\n</tool_call>' in text
    assert "<tool_response>\nset\n</tool_response>" in text


def test_a_named_function_that_is_not_offered_is_refused(tmp_path: Path) -> None:
    engine = engine_with(None, tmp_path)
    request = Generate(request_id="x", model="m", prompt="x", tools=[ALARM], tool_choice="function:nope")
    with pytest.raises(InvalidRequest, match="nope"):
        engine.admit(request)
    assert engine.active == 0


def test_families_are_told_apart_by_their_templates() -> None:
    assert tool_syntax(None) == "hermes" and tool_syntax("{{ '<tool_call>' }}") == "hermes"
    assert (
        tool_syntax("... <|python_tag|> ...") == "llama3" and tool_syntax("{{ '[TOOL_CALLS]' }}") == "mistral"
    )


def test_integer_ranges_become_enumerations_the_grammar_can_enforce() -> None:
    schema = {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 1, "maximum": 3},
        "b": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 3, "enum": [2, 5]},
        "c": {"type": "integer", "minimum": 0},  # one-sided: left alone
        "d": {"type": "array", "items": {"type": "integer", "minimum": -1, "maximum": 0}},
    }}  # fmt: skip
    props = grammar_schema(schema)["properties"]
    assert props["a"] == {"enum": [1, 2, 3]} and props["b"] == {"enum": [2]}
    assert props["c"] == {"type": "integer", "minimum": 0} and props["d"]["items"] == {"enum": [-1, 0]}


def test_each_chat_template_renders_as_itself_when_compiled_templates_are_reused() -> None:
    from actors._errors import InvalidRequest
    from actors.engine._engine import render_chat

    a = "{% for m in messages %}A:{{ m.content }};{% endfor %}"
    b = "{% for m in messages %}B:{{ m.content | upper }};{% endfor %}"
    bad = "{{ raise_exception('no system role') }}"
    hi = [{"role": "user", "content": "hi"}]
    for _ in range(2):  # the second time from the compiled ones
        assert render_chat(a, hi, "", "") == "A:hi;"
        assert render_chat(b, hi, "", "") == "B:HI;"
        with pytest.raises(InvalidRequest, match="no system role"):
            render_chat(bad, hi, "", "")
    assert render_chat(a, [{"role": "user", "content": "yo"}], "", "") == "A:yo;"

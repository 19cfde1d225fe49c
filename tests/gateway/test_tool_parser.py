"""The gateway's tool-call parser: calls found in text however it is cut, in each syntax, and
text that is not a call given back as content."""

from __future__ import annotations

import pytest

from gateway.http._tools import CallParser

HERMES_REPLY = (
    "Let me check.\n"
    '<tool_call>\n{"name": "set_alarm", "arguments": {"hour": 7, "label": "a}b"} }\n</tool_call>\n'
    '<tool_call>\n{"name": "take_note", "arguments": {}}\n</tool_call>'
)


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_the_parser_finds_the_same_calls_however_the_text_is_cut(step: int) -> None:
    parser = CallParser("hermes")
    content, fragments = "", {0: "", 1: ""}
    for at in range(0, len(HERMES_REPLY), step):
        found = parser.feed(HERMES_REPLY[at : at + step])
        content += found.content
        for index, piece in found.grown:
            fragments[index] += piece
    found = parser.finish()
    content += found.content
    for index, piece in found.grown:
        fragments[index] += piece
    assert content == "Let me check.\n"
    assert [(c.name, c.arguments) for c in parser.calls] == [
        ("set_alarm", '{"hour": 7, "label": "a}b"}'),
        ("take_note", "{}"),
    ]
    assert [fragments[0], fragments[1]] == [c.arguments for c in parser.calls]  # the stream adds up


@pytest.mark.parametrize(
    ("syntax", "text", "calls", "content"),
    [
        ("hermes", "no call here <tool", [], "no call here <tool"),
        ("hermes", "<tool_call>not json</tool_call> ok", [], "<tool_call>not json</tool_call> ok"),
        ("llama3", '<|python_tag|>{"name": "f", "parameters": {"a": 1}}', [("f", '{"a": 1}')], ""),
        ("llama3", '{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"b": 2}}',
         [("f", "{}"), ("g", '{"b": 2}')], ""),
        ("llama3", "Hello {there}", [], "Hello {there}"),
        ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}]', [("f", '{"a": 1}')], ""),
        ("mistral", '[{"name": "f", "arguments": "{\\"a\\": 1}"}]', [("f", '{"a": 1}')], ""),
        ("mistral", "[1, 2] is a list", [], "[1, 2] is a list"),
    ],
)  # fmt: skip
def test_what_is_not_a_call_stays_content(
    syntax: str, text: str, calls: list[tuple[str, str]], content: str
) -> None:
    parser = CallParser(syntax)
    out = "".join(parser.feed(ch).content for ch in text) + parser.finish().content
    assert [(c.name, c.arguments) for c in parser.calls] == calls and out == content


def test_with_parallel_calls_off_only_the_first_call_is_kept() -> None:
    for step in (1, 7, 1000):
        parser = CallParser("hermes", single=True)
        content = ""
        for at in range(0, len(HERMES_REPLY), step):
            content += parser.feed(HERMES_REPLY[at : at + step]).content
        content += parser.finish().content
        assert [c.name for c in parser.calls] == ["set_alarm"] and content == "Let me check.\n"
    parser = CallParser("llama3", single=True)
    parser.feed('{"name": "f", "parameters": {}}; {"name": "g", "parameters": {}}')
    parser.finish()
    assert [c.name for c in parser.calls] == ["f"]

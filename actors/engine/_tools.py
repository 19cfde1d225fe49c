"""Tool calling, the engine's half: which call syntax a model was trained on (read off its chat
template), the messages and tools its template is given, and the grammar that forces a call.

The gateway's half (`gateway/http/_tools.py`) parses calls out of the generated text; the two
agree on the syntax names below, which `Started.tool_syntax` carries from here to there.

- `hermes`: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (Hermes, Qwen 2/2.5/3,
  and the fallback for templates that know no tools: their system message is told the syntax).
- `llama3`: a JSON object `{"name": ..., "parameters": {...}}`, after `<|python_tag|>` or alone.
- `mistral`: `[TOOL_CALLS]` then a JSON array of `{"name": ..., "arguments": {...}}`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from actors._errors import InvalidRequest

SYNTAXES = ("hermes", "llama3", "mistral")

FALLBACK_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def tool_syntax(template: str | None) -> str:
    """The call syntax of the model whose chat template this is."""
    text = template or ""
    if "[TOOL_CALLS]" in text:
        return "mistral"
    if "<|python_tag|>" in text or "ipython" in text:
        return "llama3"
    return "hermes"


def knows_tools(template: str | None) -> bool:
    """Whether the template renders `tools` and assistant `tool_calls` itself."""
    text = template or ""
    return "tools" in text and "tool_calls" in text


def template_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]], native: bool
) -> list[dict[str, Any]]:
    """The conversation as a chat template takes it. `native` templates get tool calls and tool
    results as Hugging Face passes them (arguments as objects); the others get them as text in
    the fallback syntax, with the tools described in the system message."""
    calls_by_id: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for m in messages:
        calls = m.get("tool_calls") or []
        for call in calls:
            calls_by_id[call.get("id", "")] = call["function"]["name"]
        if native:
            if calls:
                m = {**m, "tool_calls": [_hf_call(c) for c in calls]}
            if m["role"] == "tool" and "name" not in m:
                m = {**m, "name": calls_by_id.get(m.get("tool_call_id", ""), "")}
            out.append(m)
        elif calls:
            text = "".join(
                f"<tool_call>\n{json.dumps(_hf_call(c)['function'], ensure_ascii=False)}\n</tool_call>"
                for c in calls
            )
            content = m.get("content") or ""
            out.append({"role": "assistant", "content": f"{content}\n{text}" if content else text})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools and not native:
        described = FALLBACK_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{described}"}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


def _hf_call(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI tool call (arguments: a JSON string) as templates take it (arguments: an object)."""
    function = call["function"]
    arguments = function.get("arguments", "{}")
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        parsed = arguments  # passed on as the client wrote it
    return {
        "id": call.get("id", ""),
        "type": "function",
        "function": {"name": function["name"], "arguments": parsed},
    }


MAX_ENUMERATED = 1024  # integer ranges up to this many values are enforced by the grammar


def grammar_schema(schema: Any) -> Any:
    """`schema` as llama-cpp-python's JSON-schema-to-GBNF converter enforces it: that converter
    ignores `minimum`/`maximum` on integers, so a bounded range (of up to `MAX_ENUMERATED` values)
    becomes the `enum` of its values. Wider or one-sided ranges stay unenforced."""
    if isinstance(schema, list):
        return [grammar_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: grammar_schema(value) for key, value in schema.items()}
    if out.get("type") == "integer":
        low, high = (
            _bound(out, "minimum", "exclusiveMinimum", 1),
            _bound(out, "maximum", "exclusiveMaximum", -1),
        )
        if low is not None and high is not None and 0 <= high - low < MAX_ENUMERATED:
            values = [v for v in range(low, high + 1) if "enum" not in out or v in out["enum"]]
            out = {key: value for key, value in out.items() if key not in _RANGE_KEYS}
            out.pop("type")
            out["enum"] = values
    return out


_RANGE_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum")


def _bound(schema: dict[str, Any], inclusive: str, exclusive: str, step: int) -> int | None:
    import math

    if isinstance(schema.get(exclusive), int | float):
        edge = schema[exclusive]
        return int(math.floor(edge) + 1 if step > 0 else math.ceil(edge) - 1)
    if isinstance(schema.get(inclusive), int | float):
        edge = schema[inclusive]
        return int(math.ceil(edge) if step > 0 else math.floor(edge))
    return None


def call_grammar(syntax: str, tools: list[dict[str, Any]], choice: str) -> str:
    """GBNF for one call in `syntax`: to one of `tools` (`choice` "required"), or to the function
    `choice` names ("function:NAME"), its arguments valid under that function's JSON schema."""
    from llama_cpp import llama_grammar

    if choice.startswith("function:"):
        name = choice.removeprefix("function:")
        tools = [t for t in tools if t["function"]["name"] == name]
        if not tools:
            raise InvalidRequest(
                f"tool_choice names {name!r}, which is not among the tools", param="tool_choice"
            )
    key = "parameters" if syntax == "llama3" else "arguments"
    alternatives = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                key: t["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", key],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    try:
        call = llama_grammar.json_schema_to_gbnf(json.dumps(grammar_schema(schema)))
    except Exception as err:  # the converter raises what it likes on schemas it cannot do
        raise InvalidRequest(f"tools: a function's parameters have no grammar: {err}", param="tools") from err
    call = re.sub(r"^root ::=", "call ::=", call, count=1, flags=re.M)
    # Control tokens (`<|python_tag|>`, mistral's `[TOOL_CALLS]`) are left out: their text is not
    # what a grammar matches, and the parser takes a call without them.
    wrapper = {
        "hermes": 'root ::= "<tool_call>\\n" call "\\n</tool_call>"',
        "llama3": "root ::= call",
        "mistral": 'root ::= "[" call "]"',
    }[syntax]
    return f"{wrapper}\n{call}"

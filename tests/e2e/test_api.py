"""The OpenAI surface that agents and frameworks use, driven by the official `openai` client and
`langchain-openai` against a real node serving a synthesized model with a tool-aware chat template
(Qwen 2.5's Hermes syntax). With random weights, constrained decoding is what makes a call or a
JSON answer come out: that is what these tests rely on, and what they check."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import openai
import pytest

from actors.gguf import shape_for, synthesize
from tests.support.nodes import NodeProcess, eventually, start_node, start_nodes

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
MODEL = "api-tiny"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 9},
                "metric": {"type": "boolean"},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "set_alarm",
        "parameters": {
            "type": "object",
            "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}},
            "required": ["hour"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Oslo for 3 days?"}]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    model = synthesize(
        "llama", tmp_path_factory.mktemp("api") / f"{MODEL}.gguf", shape_for("llama", "tiny"), seed=4
    )
    # Every token its own event (as on a slower model): streamed tool calls arrive in pieces.
    args = ("--slots", "2", "--alias", "gpt-4o-mini", "--alias", "local", "--no-mdns", "--mesh", "api",
            "--stream-interval", "0")  # fmt: skip
    proc = start_node(tmp_path_factory.mktemp("node"), model, *args)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client_node(node: NodeProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A node serving nothing that reaches `node` through the mesh."""
    args = ["--no-mdns", "--mesh", "api", "--peer", f"127.0.0.1:{node.zmq_port}"]
    proc = start_nodes(tmp_path_factory.mktemp("client"), None, [args])[0]
    eventually(lambda: MODEL in httpx.get(f"{proc.url}/v1/models", timeout=5).text, timeout_s=30)
    yield proc
    proc.stop()


@pytest.fixture
def oai(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0, timeout=60)


def valid_weather(arguments: dict[str, Any]) -> bool:
    """The schema of get_weather, checked by hand."""
    return (
        set(arguments) <= {"city", "days", "metric"}
        and arguments.get("city") in ("Paris", "Oslo", "Lima")
        and isinstance(arguments.get("days"), int)
        and 1 <= arguments["days"] <= 9
        and isinstance(arguments.get("metric", True), bool)
    )


def test_tool_choice_required_returns_a_call_whose_arguments_fit_the_schema(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, CLOCK], tool_choice="required",  # type: ignore[list-item,arg-type]
        max_tokens=200, temperature=0,
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and len(calls) == 1 and calls[0].type == "function" and calls[0].id.startswith("call_")
    function = calls[0].function  # type: ignore[union-attr]
    arguments = json.loads(function.arguments)
    if function.name == "get_weather":
        assert valid_weather(arguments), arguments
    else:
        assert (
            function.name == "set_alarm"
            and isinstance(arguments["hour"], int)
            and 0 <= arguments["hour"] <= 23
        )
    # The control: without tools, the same greedy request writes no call.
    plain = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=30, temperature=0)  # type: ignore[arg-type]
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason != "tool_calls"


def test_a_named_function_is_the_one_called_even_when_sampling(oai: openai.OpenAI) -> None:
    for seed in (1, 2, 3):
        reply = oai.chat.completions.create(
            model=MODEL, messages=ASK, tools=[CLOCK, WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=200, temperature=1.0, seed=seed,
        )  # fmt: skip
        calls = reply.choices[0].message.tool_calls
        assert calls and calls[0].function.name == "get_weather"  # type: ignore[union-attr]
        assert valid_weather(json.loads(calls[0].function.arguments))  # type: ignore[union-attr]


def test_streamed_tool_call_deltas_reassemble_into_the_same_call(oai: openai.OpenAI) -> None:
    ask = dict(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=200, temperature=0
    )
    whole = oai.chat.completions.create(**ask)  # type: ignore[call-overload]
    chunks = list(oai.chat.completions.create(**ask, stream=True))  # type: ignore[call-overload]
    calls: dict[int, dict[str, str]] = {}
    fragments = 0
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            if delta.id:
                call["id"] = delta.id
            if delta.function and delta.function.name:
                call["name"] = delta.function.name
            if delta.function and delta.function.arguments:
                call["arguments"] += delta.function.arguments
                fragments += 1
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    expected = whole.choices[0].message.tool_calls[0].function  # type: ignore[index]
    assert list(calls) == [0] and calls[0]["id"].startswith("call_")
    assert (calls[0]["name"], calls[0]["arguments"]) == (expected.name, expected.arguments)
    assert fragments > 1  # the arguments stream as they are generated


def test_a_conversation_with_earlier_calls_and_their_results_is_rendered(oai: openai.OpenAI) -> None:
    arguments = json.dumps({"city": "Oslo", "days": 3})
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Snow, -4 C."},
    ]  # fmt: skip
    short = oai.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=4, temperature=0
    )  # type: ignore[list-item,arg-type]
    long = oai.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], max_tokens=4, temperature=0
    )  # type: ignore[list-item,arg-type]
    assert long.usage and short.usage
    # The call and its result reach the prompt: at least their words' worth of tokens more.
    assert long.usage.prompt_tokens >= short.usage.prompt_tokens + len("get_weather Oslo days Snow") // 2


def test_bad_tool_requests_are_400s_naming_the_field(node: NodeProcess) -> None:
    def post(body: dict[str, Any]) -> httpx.Response:
        return httpx.post(
            f"{node.url}/v1/chat/completions", json={"model": MODEL, "messages": ASK, **body}, timeout=30
        )

    cases = [
        ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1]"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"functions": [WEATHER["function"]]}, "functions"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c"}]}]}, "messages[0].tool_calls[0]"),
    ]
    for body, param in cases:
        reply = post(body)
        assert reply.status_code == 400, (body, reply.text)
        assert reply.json()["error"]["param"] == param, (body, reply.json())


def test_a_json_schema_response_validates_and_the_client_parses_it(oai: openai.OpenAI) -> None:
    from pydantic import BaseModel, Field

    class Forecast(BaseModel):
        city: str = Field(max_length=12)  # random weights close a string only when they must
        days: int = Field(ge=1, le=9)
        sunny: bool

    reply = oai.chat.completions.parse(
        model=MODEL, messages=ASK, response_format=Forecast, max_tokens=200, temperature=0
    )  # type: ignore[arg-type]
    forecast = reply.choices[0].message.parsed
    assert isinstance(forecast, Forecast), reply.choices[0].message.content
    whole = oai.chat.completions.create(
        model=MODEL,
        messages=ASK,
        response_format={"type": "json_object"},
        max_tokens=60,
        temperature=0,  # type: ignore[arg-type]
    )
    text = whole.choices[0].message.content or ""
    assert text.lstrip().startswith("{")


def test_langchain_binds_tools_and_gets_structured_output(node: NodeProcess) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    @tool
    def get_weather(city: Literal["Paris", "Oslo", "Lima"], days: int) -> str:
        """The weather in a city for some days."""
        return "sunny"

    class Answer(BaseModel):
        sure: bool
        count: int = Field(ge=0, le=99)

    llm = ChatOpenAI(
        base_url=f"{node.url}/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=200,  # type: ignore[arg-type]
        max_retries=0,
    )  # fmt: skip
    message = llm.bind_tools([get_weather], tool_choice="required").invoke("Weather in Lima for 2 days?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"  # type: ignore[attr-defined]
    args = message.tool_calls[0]["args"]  # type: ignore[attr-defined]
    assert isinstance(args["city"], str) and isinstance(args["days"], int)
    answer = llm.with_structured_output(Answer, method="json_schema").invoke("Are you sure? How many?")
    assert isinstance(answer, Answer)


def test_logprobs_come_with_every_token_chat_and_completion_streamed_or_not(oai: openai.OpenAI) -> None:
    import math

    reply = oai.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=3,  # type: ignore[arg-type]
    )
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == reply.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 3 and token.logprob <= 0
        assert token.top_logprobs[0].token == token.token  # greedy: the likeliest is the one chosen
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob)
        assert sum(math.exp(t.logprob) for t in token.top_logprobs) <= 1 + 1e-6
    streamed = oai.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        stream=True,  # type: ignore[arg-type]
    )
    tokens = [
        t
        for c in streamed
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content or []
    ]
    assert [(t.token, t.logprob) for t in tokens] == [(t.token, t.logprob) for t in content]
    completion = oai.completions.create(
        model=MODEL, prompt="the model", max_tokens=6, temperature=0, logprobs=2
    )
    lp = completion.choices[0].logprobs
    assert (
        lp is not None
        and len(lp.tokens or []) == 6
        and "".join(lp.tokens or []) == completion.choices[0].text
    )
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs or [])  # a dict: equal pieces merge
    plain = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, temperature=0)  # type: ignore[arg-type]
    assert plain.choices[0].logprobs is None  # not asked, not given


def test_penalties_and_bias_change_greedy_output_through_the_api(oai: openai.OpenAI) -> None:
    def greedy(**kw: Any) -> str:
        reply = oai.completions.create(
            model=MODEL, prompt="the model node", max_tokens=24, temperature=0, **kw
        )
        return reply.choices[0].text

    plain = greedy()
    assert greedy(frequency_penalty=2.0) != plain
    assert greedy(presence_penalty=2.0) != plain
    forced = oai.completions.create(
        model=MODEL, prompt="the model node", max_tokens=6, temperature=0, logprobs=0, logit_bias={"300": 100}
    )
    tokens = forced.choices[0].logprobs.tokens  # type: ignore[union-attr]
    assert forced.choices[0].text != plain[: len(forced.choices[0].text)] and len(set(tokens or [])) == 1


def test_aliases_are_listed_and_answer_like_the_model(node: NodeProcess, oai: openai.OpenAI) -> None:
    listed = {m.id for m in oai.models.list()}
    assert {MODEL, "gpt-4o-mini", "local"} <= listed
    assert oai.models.retrieve("local").id == "local"
    ask = dict(messages=ASK, max_tokens=8, temperature=0)
    by_id = oai.chat.completions.create(model=MODEL, **ask)  # type: ignore[call-overload]
    by_alias = oai.chat.completions.create(model="gpt-4o-mini", **ask)  # type: ignore[call-overload]
    assert (
        by_alias.model == "gpt-4o-mini"
        and by_alias.choices[0].message.content == by_id.choices[0].message.content
    )
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-5", **ask)  # type: ignore[call-overload]


def test_tools_json_and_logprobs_work_through_another_node_by_alias(client_node: NodeProcess) -> None:
    """The request crosses the mesh: a node that serves nothing forwards it to the one that does."""
    remote = openai.OpenAI(base_url=f"{client_node.url}/v1", api_key="unused", max_retries=0, timeout=60)
    reply = remote.chat.completions.create(
        model="local", messages=ASK, tools=[WEATHER], tool_choice="required",  # type: ignore[list-item,arg-type]
        max_tokens=200, temperature=0, logprobs=True,
    )  # fmt: skip
    call = reply.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather" and valid_weather(json.loads(call.function.arguments))  # type: ignore[union-attr]
    assert (
        reply.choices[0].logprobs
        and len(reply.choices[0].logprobs.content or []) == reply.usage.completion_tokens
    )  # type: ignore[union-attr]
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["n"],
    }
    shaped = remote.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},  # type: ignore[typeddict-item]
    )  # fmt: skip
    assert 1 <= json.loads(shaped.choices[0].message.content or "")["n"] <= 5


def test_embeddings_are_unit_vectors_that_tell_texts_apart(
    oai: openai.OpenAI, client_node: NodeProcess
) -> None:
    import base64
    import struct

    texts = ["the model node", "the model node", "memory error while", "x" * 50]
    reply = oai.embeddings.create(model=MODEL, input=texts)
    vectors = [d.embedding for d in sorted(reply.data, key=lambda d: d.index)]
    assert len(vectors) == 4 and len({len(v) for v in vectors}) == 1 and len(vectors[0]) > 8
    dot = lambda a, b: sum(x * y for x, y in zip(a, b, strict=True))  # noqa: E731
    assert all(abs(dot(v, v) - 1) < 1e-4 for v in vectors)
    assert dot(vectors[0], vectors[1]) > 0.9999 and dot(vectors[0], vectors[2]) < 0.999
    assert reply.usage.prompt_tokens > 4
    # base64 (what the openai client asks for by default when numpy is around) decodes the same
    raw = httpx.post(
        f"{oai.base_url}embeddings",
        json={"model": MODEL, "input": texts[2], "encoding_format": "base64"},
        timeout=30,
    ).json()
    decoded = struct.unpack(f"<{len(vectors[2])}f", base64.b64decode(raw["data"][0]["embedding"]))
    assert max(abs(a - b) for a, b in zip(decoded, vectors[2], strict=True)) < 1e-6
    # through another node, by alias
    remote = openai.OpenAI(base_url=f"{client_node.url}/v1", api_key="unused", max_retries=0, timeout=60)
    far = remote.embeddings.create(model="local", input="memory error while").data[0].embedding
    assert max(abs(a - b) for a, b in zip(far, vectors[2], strict=True)) < 1e-5
    for bad, param in (([], "input"), ([1, 2], "input"), ([""], "input")):
        answer = httpx.post(f"{oai.base_url}embeddings", json={"model": MODEL, "input": bad}, timeout=30)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param
    dims = httpx.post(
        f"{oai.base_url}embeddings", json={"model": MODEL, "input": "x", "dimensions": 8}, timeout=30
    )
    assert dims.status_code == 400 and dims.json()["error"]["param"] == "dimensions"
    missing = httpx.post(f"{oai.base_url}embeddings", json={"model": "nope", "input": "x"}, timeout=30)
    assert missing.status_code == 404


def test_the_responses_api_answers_text_tools_and_streams_events(oai: openai.OpenAI) -> None:
    text = oai.responses.create(model=MODEL, input="Say something.", max_output_tokens=8, temperature=0)
    assert text.output_text and text.status == "incomplete" and text.usage.output_tokens == 8  # type: ignore[union-attr]
    assert text.incomplete_details and text.incomplete_details.reason == "max_output_tokens"
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}  # type: ignore[index]
    ask: dict[str, Any] = dict(
        model=MODEL,
        input=ASK[0]["content"],
        tools=[tool],
        tool_choice="required",
        max_output_tokens=200,
        temperature=0,
    )
    called = oai.responses.create(**ask)
    calls = [item for item in called.output if item.type == "function_call"]
    assert (
        len(calls) == 1 and calls[0].name == "get_weather" and valid_weather(json.loads(calls[0].arguments))
    )  # type: ignore[union-attr]
    kinds, fragments, final = [], "", None
    for event in oai.responses.create(**ask, stream=True):
        kinds.append(event.type)
        if event.type == "response.function_call_arguments.delta":
            fragments += event.delta
        if event.type == "response.completed":
            final = event.response
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_item.added" in kinds and "response.function_call_arguments.done" in kinds
    assert final is not None and fragments == calls[0].arguments  # type: ignore[union-attr]
    # The call and its output go back in as items of the next turn.
    call_id, arguments = calls[0].call_id, calls[0].arguments  # type: ignore[union-attr]
    follow = oai.responses.create(
        model=MODEL, max_output_tokens=4, temperature=0, tools=[tool],  # type: ignore[list-item]
        input=[
            {"role": "user", "content": ASK[0]["content"]},
            {"type": "function_call", "call_id": call_id, "name": "get_weather", "arguments": arguments},
            {"type": "function_call_output", "call_id": call_id, "output": "Snow."},
        ],
    )  # fmt: skip
    assert follow.usage and follow.usage.input_tokens > called.usage.input_tokens  # type: ignore[union-attr]
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        oai.responses.create(model=MODEL, input="x", previous_response_id="resp_1")


def test_anthropic_s_client_gets_text_streams_and_tool_use(node: NodeProcess) -> None:
    import anthropic

    claude = anthropic.Anthropic(base_url=node.url, api_key="unused", max_retries=0, timeout=60)
    GREEDY = {"temperature": 0}  # this client no longer has the argument; older ones send it
    reply = claude.messages.create(
        model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Hi"}], extra_body=GREEDY
    )
    assert reply.content[0].type == "text" and reply.content[0].text and reply.stop_reason == "max_tokens"  # type: ignore[union-attr]
    with claude.messages.stream(
        model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Hi"}], extra_body=GREEDY
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == reply.content[0].text == final.content[0].text  # type: ignore[union-attr]
    tool = {
        "name": "get_weather",
        "description": "Weather.",
        "input_schema": WEATHER["function"]["parameters"],
    }  # type: ignore[index]
    used = claude.messages.create(
        model=MODEL, max_tokens=200, extra_body=GREEDY, tools=[tool], tool_choice={"type": "any"},  # type: ignore[list-item]
        messages=[{"role": "user", "content": ASK[0]["content"]}],
    )  # fmt: skip
    blocks = [b for b in used.content if b.type == "tool_use"]
    assert used.stop_reason == "tool_use" and len(blocks) == 1 and valid_weather(blocks[0].input)  # type: ignore[arg-type,union-attr]
    with claude.messages.stream(
        model=MODEL,
        max_tokens=200,
        extra_body=GREEDY,
        tools=[tool],
        tool_choice={"type": "any"},  # type: ignore[list-item]
        messages=[{"role": "user", "content": ASK[0]["content"]}],
    ) as stream:
        again = stream.get_final_message()
    assert [b.input for b in again.content if b.type == "tool_use"] == [blocks[0].input]  # type: ignore[union-attr]
    use = {"id": blocks[0].id, "name": "get_weather", "input": blocks[0].input}  # type: ignore[union-attr]
    after = claude.messages.create(
        model=MODEL, max_tokens=4, extra_body=GREEDY, tools=[tool],  # type: ignore[list-item]
        messages=[
            {"role": "user", "content": ASK[0]["content"]},
            {"role": "assistant", "content": [{"type": "tool_use", **use}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"], "content": "S"}]},
        ],
    )  # fmt: skip
    assert after.usage.input_tokens > used.usage.input_tokens
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude.messages.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens="x")  # type: ignore[arg-type]
    assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(
            model="claude-nope", max_tokens=4, messages=[{"role": "user", "content": "Hi"}]
        )


def test_streamed_completion_logprobs_have_offsets_into_the_whole_text(node: NodeProcess) -> None:
    body = {"model": MODEL, "prompt": "the model", "max_tokens": 10, "temperature": 0, "logprobs": 1}
    whole = httpx.post(f"{node.url}/v1/completions", json=body, timeout=30).json()["choices"][0]
    tokens, offsets = [], []
    with httpx.stream("POST", f"{node.url}/v1/completions", json={**body, "stream": True}, timeout=30) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                lp = json.loads(line[6:])["choices"][0]["logprobs"]
                if lp:
                    tokens += lp["tokens"]
                    offsets += lp["text_offset"]
    assert tokens == whole["logprobs"]["tokens"] and offsets == whole["logprobs"]["text_offset"]
    assert offsets == sorted(offsets) and len(set(offsets)) > 1

"""The HTTP app through `falcon.testing`, with a fake backend at the seam."""

from __future__ import annotations

import json
from typing import Any

import pytest

from actors import (
    Accepted,
    Chunk,
    ContextOverflow,
    EngineFailed,
    Finished,
    Generate,
    ModelNotFound,
    Overloaded,
    PeerUnavailable,
    RequestError,
    Started,
)
from gateway import create_app
from gateway.http._backend import EventStream
from tests.support.asgi import AsgiClient


class FakeBackend:
    """Answers with scripted events; `fail` raises before the stream, `fail_mid` after 1 chunk."""

    def __init__(self) -> None:
        self.requests: list[Generate] = []
        self.closed: list[bool] = []
        self.fail: RequestError | None = None
        self.fail_mid: RequestError | None = None
        self.ready = True

    def stream(self, request: Generate) -> EventStream:
        self.requests.append(request)
        return self._events(request)

    async def _events(self, request: Generate) -> EventStream:
        finished = False
        try:
            if self.fail is not None:
                raise self.fail
            rid = request.request_id
            yield Accepted(request_id=rid, node_id="node-b")
            yield Started(request_id=rid, prompt_tokens=5)
            for word in ("Hello", " world"):
                yield Chunk(request_id=rid, text=word, n_tokens=1)
                if self.fail_mid is not None:
                    raise self.fail_mid
            finished = True
            yield Finished(request_id=rid, finish_reason="length", prompt_tokens=5, completion_tokens=2)
        finally:
            self.closed.append(finished)

    async def query(self, what: str) -> dict[str, Any]:
        return {"models": ["m1"], "ready": self.ready}


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def client(backend: FakeBackend) -> AsgiClient:
    return AsgiClient(create_app(backend, node_id="node-a", max_body_bytes=2000))


CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}


def sse_events(body: str) -> list[Any]:
    out: list[Any] = []
    for block in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        data = lines["data"]
        out.append(data if data == "[DONE]" else (lines.get("event"), json.loads(data)))
    return out


def test_health_is_200_ok_when_ready_and_503_while_loading(client: AsgiClient, backend: FakeBackend) -> None:
    assert client.simulate_get("/health").json == {"status": "ok"}
    backend.ready = False
    result = client.simulate_get("/health")
    assert result.status_code == 503 and result.json == {"status": "loading"}


def test_models_lists_the_backends_models(client: AsgiClient) -> None:
    result = client.simulate_get("/v1/models")
    assert result.json["object"] == "list"
    assert [m["id"] for m in result.json["data"]] == ["m1"]
    assert result.headers["X-Mesh-Node"] == "node-a"


def test_a_chat_completion_has_the_openai_shape_and_names_the_generating_node(
    client: AsgiClient, backend: FakeBackend
) -> None:
    result = client.simulate_post(
        "/v1/chat/completions", json={**CHAT, "temperature": 0, "seed": 3, "stop": "x", "max_tokens": 9}
    )
    assert result.status_code == 200
    body = result.json
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello world"}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert result.headers["X-Mesh-Node"] == "node-b"
    sent = backend.requests[0]
    assert (sent.temperature, sent.seed, sent.stop, sent.max_tokens) == (0.0, 3, ["x"], 9)
    assert sent.messages == [{"role": "user", "content": "hi"}]


def test_a_streamed_chat_sends_role_content_finish_usage_and_done(client: AsgiClient) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    result = client.simulate_post("/v1/chat/completions", json=body)
    assert result.headers["content-type"].startswith("text/event-stream")
    events = sse_events(result.text)
    assert events[-1] == "[DONE]"
    chunks = [e[1] for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hello"}
    assert chunks[1]["choices"][0]["delta"] == {"content": " world"}
    assert chunks[2]["choices"][0]["finish_reason"] == "length"
    assert chunks[3]["choices"] == [] and chunks[3]["usage"]["total_tokens"] == 7
    assert all(c["usage"] is None for c in chunks[:3])
    assert len({c["id"] for c in chunks}) == 1


def test_a_streamed_completion_uses_text_completion_chunks(client: AsgiClient) -> None:
    result = client.simulate_post("/v1/completions", json={"model": "m1", "prompt": "hi", "stream": True})
    chunks = [e[1] for e in sse_events(result.text)[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == ["Hello", " world", ""]
    assert chunks[0]["object"] == "text_completion" and "usage" not in chunks[0]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m1"}, "messages"),
        ({"model": "m1", "messages": []}, "messages"),
        ({"model": "m1", "messages": [{"content": "x"}]}, "messages[0]"),
        ({"model": "m1", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "m1", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({**CHAT, "temperature": 3}, "temperature"),
        ({**CHAT, "temperature": "hot"}, "temperature"),
        ({**CHAT, "top_p": -0.1}, "top_p"),
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "max_tokens": 1.5}, "max_tokens"),
        ({**CHAT, "max_tokens": True}, "max_tokens"),
        ({**CHAT, "seed": "x"}, "seed"),
        ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({**CHAT, "stop": [1]}, "stop"),
        ({**CHAT, "n": 17}, "n"),
        ({**CHAT, "n": 0}, "n"),
        ({**CHAT, "stream": "yes"}, "stream"),
        ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_invalid_parameters_are_400_with_param_set(
    client: AsgiClient, body: dict[str, Any], param: str, backend: FakeBackend
) -> None:
    result = client.simulate_post("/v1/chat/completions", json=body)
    assert result.status_code == 400
    assert result.json["error"]["param"] == param
    assert result.json["error"]["type"] == "invalid_request_error"
    assert backend.requests == []


@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b"\xff\xfe", b""])
def test_malformed_json_is_400(client: AsgiClient, raw: bytes) -> None:
    result = client.simulate_post("/v1/completions", body=raw, headers={"Content-Type": "application/json"})
    assert result.status_code == 400
    assert set(result.json["error"]) == {"message", "type", "param", "code"}


def test_a_body_over_the_limit_is_413(client: AsgiClient) -> None:
    result = client.simulate_post("/v1/completions", json={"model": "m1", "prompt": "x" * 5000})
    assert result.status_code == 413 and result.json["error"]["code"] == "request_too_large"


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (ModelNotFound("no such model", param="model"), 404, "model_not_found"),
        (ContextOverflow("too long", n_ctx=8, prompt_tokens=9, max_tokens=1), 400, "context_length_exceeded"),
        (Overloaded("full", retry_after=2), 429, "overloaded"),
        (EngineFailed("boom"), 503, "engine_failed"),
        (PeerUnavailable("gone"), 503, "peer_unavailable"),
    ],
)
def test_node_errors_map_to_one_status_each(
    client: AsgiClient, backend: FakeBackend, error: RequestError, status: int, code: str
) -> None:
    backend.fail = error
    result = client.simulate_post("/v1/chat/completions", json=CHAT)
    assert result.status_code == status
    assert result.json["error"]["code"] == code
    assert result.headers["X-Mesh-Node"] == "node-a"
    if status == 429:
        assert result.headers["Retry-After"] == "2"
    if code == "context_length_exceeded":
        assert result.json["error"]["prompt_tokens"] == 9 and result.json["error"]["n_ctx"] == 8
    if code == "model_not_found":
        assert result.json["error"]["param"] == "model"


def test_a_failure_after_streaming_began_ends_with_an_sse_error_event_and_no_done(
    client: AsgiClient, backend: FakeBackend
) -> None:
    backend.fail_mid = EngineFailed("engine died")
    result = client.simulate_post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = sse_events(result.text)
    assert "[DONE]" not in events
    assert events[-1][0] == "error" and events[-1][1]["error"]["code"] == "engine_failed"
    assert backend.closed == [False]


def test_unknown_routes_and_methods_are_openai_errors(client: AsgiClient) -> None:
    result = client.simulate_get("/v1/nothing")
    assert result.status_code == 404 and "Unknown request URL" in result.json["error"]["message"]
    result = client.simulate_get("/v1/chat/completions")
    assert result.status_code == 405 and "error" in result.json


def test_an_api_key_guards_everything_but_health(backend: FakeBackend) -> None:
    client = AsgiClient(create_app(backend, node_id="n", api_key="s3cret"))
    assert client.simulate_get("/health").status_code == 200
    denied = client.simulate_get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert denied.status_code == 401 and denied.json["error"]["code"] == "invalid_api_key"
    assert client.simulate_get("/v1/models").status_code == 401
    assert client.simulate_get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b'{"model": "m1", "prompt": "x", "seed": 18446744073709551616}', "seed"),
        (b'{"model": "m1", "prompt": "x", "seed": -9223372036854775809}', "seed"),
        (b'{"model": "m1", "prompt": "x", "max_tokens": 18446744073709551616}', "max_tokens"),
        (b'{"model": "m1", "prompt": "x", "max_tokens": 1e400}', "max_tokens"),
        (b'{"model": "m1", "prompt": "\\ud800"}', None),
        (b'{"model": "m1", "prompt": "x", "temperature": NaN}', None),
        (b'{"model": "m1", "prompt": "x", "top_p": Infinity}', None),
        (b'{"model": "m1", "prompt": "x", "user": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
    ],
)
def test_out_of_range_numbers_lone_surrogates_nan_and_deep_nesting_are_400_not_500(
    client: AsgiClient, backend: FakeBackend, raw: bytes, why: str | None
) -> None:
    """Wave 1 answered 500 to each of these, or (NaN) accepted it."""
    result = AsgiClient(create_app(backend, node_id="n")).simulate_post(
        "/v1/completions", body=raw, headers={"Content-Type": "application/json"}
    )
    assert result.status_code == 400, result.text
    assert result.json["error"]["type"] == "invalid_request_error"
    if why is not None:
        assert result.json["error"]["param"] == why
    assert backend.requests == []


def test_null_optional_parameters_mean_their_defaults(client: AsgiClient, backend: FakeBackend) -> None:
    nulls = {k: None for k in ("temperature", "top_p", "seed", "stop", "max_tokens", "n", "stream", "user")}
    result = client.simulate_post("/v1/chat/completions", json={**CHAT, **nulls, "stream_options": None})
    assert result.status_code == 200, result.text
    sent = backend.requests[0]
    assert (sent.temperature, sent.top_p, sent.seed, sent.stop, sent.max_tokens) == (1.0, 1.0, None, [], None)


def test_head_health_is_200_and_a_405_names_the_allowed_methods(client: AsgiClient) -> None:
    assert client.simulate_head("/health").status_code == 200
    result = client.simulate_get("/v1/chat/completions")
    assert result.status_code == 405 and "POST" in result.headers["Allow"]


def test_sampling_controls_reach_the_engine(client: AsgiClient, backend: FakeBackend) -> None:
    body = {
        **CHAT, "temperature": 0.7, "top_k": 40, "min_p": 0.05, "presence_penalty": 0.5,
        "frequency_penalty": -0.25, "repeat_penalty": 1.1, "logit_bias": {"42": -100, "7": 5.5},
    }  # fmt: skip
    assert client.simulate_post("/v1/chat/completions", json=body).status_code == 200
    sent = backend.requests[0]
    assert (sent.top_k, sent.min_p, sent.presence_penalty, sent.frequency_penalty, sent.repeat_penalty) == (
        40, 0.05, 0.5, -0.25, 1.1,
    )  # fmt: skip
    assert sent.logit_bias == {"42": -100.0, "7": 5.5}


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"top_k": -1}, "top_k", "between"),
        ({"min_p": 1.5}, "min_p", "between"),
        ({"presence_penalty": 3}, "presence_penalty", "between"),
        ({"frequency_penalty": "lots"}, "frequency_penalty", "number"),
        ({"repeat_penalty": 0}, "repeat_penalty", "between"),
        ({"logit_bias": {"x": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {"3": 101}}, "logit_bias[3]", "between"),
        ({"logit_bias": [1, 2]}, "logit_bias", "object"),
        ({"frobnicate": True}, "frobnicate", "Unrecognized request argument"),
        ({"functions": [{"name": "f"}]}, "functions", "not supported"),
        ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
        ({"response_format": {"type": "xml"}}, "response_format", "must be of type"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
            "schema",
        ),
        ({"logprobs": 1}, "logprobs", "must be a bool"),
        ({"top_logprobs": 3}, "top_logprobs", "needs 'logprobs'"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "between"),
    ],
)
def test_parameters_not_honoured_are_refused_by_name(
    client: AsgiClient, extra: dict[str, Any], param: str, words: str
) -> None:
    """A parameter the node cannot honour is a 400 naming it, never silently ignored."""
    result = client.simulate_post("/v1/chat/completions", json={**CHAT, **extra})
    assert result.status_code == 400, result.text
    error = result.json["error"]
    assert error["param"] == param and words in error["message"], error


@pytest.mark.parametrize(
    "extra",
    [
        {
            "tools": [],
            "tool_choice": "none",
            "parallel_tool_calls": False,
            "response_format": {"type": "text"},
        },
        {"logprobs": False, "top_logprobs": 0, "metadata": {"a": "b"}, "store": False, "user": "u"},
        {"tools": None, "logprobs": None, "response_format": None, "logit_bias": None, "top_k": None},
    ],
)
def test_parameters_that_ask_for_nothing_are_accepted(client: AsgiClient, extra: dict[str, Any]) -> None:
    assert client.simulate_post("/v1/chat/completions", json={**CHAT, **extra}).status_code == 200


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"echo": True}, "echo"),
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"logprobs": 6}, "logprobs"),  # OpenAI allows up to 5
    ],
)
def test_completion_parameters_not_honoured_are_refused_by_name(
    client: AsgiClient, extra: dict[str, Any], param: str
) -> None:
    body = {"model": "m1", "prompt": "hi", **extra}
    result = client.simulate_post("/v1/completions", json=body)
    assert result.status_code == 400 and result.json["error"]["param"] == param
    fine = {"model": "m1", "prompt": "hi", "echo": False, "suffix": "", "best_of": 1, "logprobs": 0}
    assert client.simulate_post("/v1/completions", json=fine).status_code == 200


def test_a_model_is_retrieved_by_id_and_an_unknown_one_is_openais_404(client: AsgiClient) -> None:
    result = client.simulate_get("/v1/models/m1")
    assert result.status_code == 200
    assert result.json == {"id": "m1", "object": "model", "created": 0, "owned_by": "mesh-llm"}
    missing = client.simulate_get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json["error"]["code"] == "model_not_found"


def test_cors_allows_the_configured_origins_and_answers_preflights_without_a_key(
    backend: FakeBackend,
) -> None:
    app = create_app(backend, node_id="node-a", api_key="k3y", cors_origins=["https://app.example"])
    client = AsgiClient(app)
    preflight = client.simulate_request(
        "OPTIONS", "/v1/chat/completions",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"},
    )  # fmt: skip
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    auth = {"Origin": "https://app.example", "Authorization": "Bearer k3y"}
    reply = client.simulate_post("/v1/chat/completions", json=CHAT, headers=auth)
    assert reply.status_code == 200 and reply.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "X-Mesh-Node" in reply.headers["Access-Control-Expose-Headers"]
    assert (
        client.simulate_post(
            "/v1/chat/completions", json=CHAT, headers={"Origin": "https://app.example"}
        ).status_code
        == 401
    )
    other = client.simulate_post(
        "/v1/chat/completions", json=CHAT, headers={**auth, "Origin": "https://evil.example"}
    )
    assert "Access-Control-Allow-Origin" not in other.headers
    # Without --cors-origin no browser origin is allowed.
    plain = AsgiClient(create_app(backend, node_id="node-a")).simulate_get(
        "/v1/models", headers={"Origin": "https://app.example"}
    )
    assert "Access-Control-Allow-Origin" not in plain.headers

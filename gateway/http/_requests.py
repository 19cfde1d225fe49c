"""Parsing OpenAI request bodies into a `Generate` and the response options around it."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from actors import Generate
from gateway.http._errors import ApiError

_MAX_STOPS = 4
_MAX_LOGIT_BIAS = 1024  # entries
_MAX_TOOLS = 128
_MAX_N = 16  # choices per request (each one a request of its own)

# Every field a request may carry. Those this node does not implement yet are refused by name
# when they ask for something (a 400), and accepted when they hold the default: nothing a client
# asks for is silently ignored.
_COMMON = {
    "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "min_p",
    "presence_penalty", "frequency_penalty", "repeat_penalty", "logit_bias", "seed", "stop", "n",
    "user", "speculative", "metadata", "store", "service_tier",
}  # fmt: skip
_CHAT = _COMMON | {
    "messages", "max_completion_tokens", "response_format", "tools", "tool_choice", "parallel_tool_calls",
    "logprobs", "top_logprobs",
}  # fmt: skip
_COMPLETION = _COMMON | {"prompt", "logprobs"}
_MAX_TOP_LOGPROBS = {"chat": 20, "completion": 5}  # OpenAI's limits
_NOT_YET: dict[str, Any] = {  # field -> a test of the values that ask for nothing
    "tools": lambda v: v == [],  # completions: no chat template to render them
    "tool_choice": lambda v: v == "none",
    "parallel_tool_calls": lambda v: isinstance(v, bool),  # completions: no tools
    "functions": lambda v: v == [],
    "function_call": lambda v: v == "none",
    "response_format": lambda v: v == {"type": "text"},
    "top_logprobs": lambda v: v == 0,  # completions: `logprobs` is the count there
    "echo": lambda v: v is False,
    "suffix": lambda v: v == "",
    "best_of": lambda v: v == 1,
    "modalities": lambda v: v == ["text"],
    "audio": lambda v: False,
    "prediction": lambda v: False,
    "web_search_options": lambda v: False,
    "reasoning_effort": lambda v: False,
}
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # what the wire carries


@dataclass(frozen=True, slots=True)
class Parsed:
    """A valid request: what to ask the router, and how to shape the answer."""

    generate: Generate
    stream: bool
    include_usage: bool
    n: int = 1  # choices: as many requests
    parallel_tool_calls: bool = True  # False: one tool call at most


def read_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; 400 for anything else, including what Python's parser takes but
    JSON forbids or nothing downstream can carry (NaN, lone surrogates, absurd nesting)."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
        json.dumps(body, ensure_ascii=False).encode("utf-8")  # lone surrogates cannot be UTF-8
    except RecursionError:
        raise ApiError(400, "The JSON body of your request is nested too deeply.") from None
    except (ValueError, UnicodeError) as err:
        raise ApiError(400, f"We could not parse the JSON body of your request: {err}") from err
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def session_key(body: dict[str, Any], header: str | None, what: dict[str, Any]) -> str:
    """Which session a request belongs to: `user`, else `X-Session-Id`, else a hash of how the
    conversation began (system and first user message, or the start of the prompt)."""
    user = body.get("user")
    if isinstance(user, str) and user:
        return f"user:{user}"
    if header:
        return f"session:{header}"
    messages = what.get("messages") or []
    opening = [m for m in messages if m["role"] == "system"][:1] + [
        m for m in messages if m["role"] == "user"
    ][:1]
    text = json.dumps(opening) if messages else str(what.get("prompt", ""))[:256]
    return "opening:" + hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def check_fields(body: dict[str, Any], known: set[str], not_yet: dict[str, Any] | None = None) -> None:
    """400 for a field we do not know, or one we do not implement (`not_yet`: field -> a test of
    the values that ask for nothing) set to ask for something."""
    for key, value in body.items():
        if key in known or value is None:
            continue
        asks_nothing = (_NOT_YET if not_yet is None else not_yet).get(key)
        if asks_nothing is None:
            raise ApiError(400, f"Unrecognized request argument supplied: {key}", param=key)
        if not asks_nothing(value):
            raise ApiError(400, f"'{key}' is not supported by this node yet.", param=key)


def parse_chat(body: dict[str, Any], session_header: str | None = None) -> Parsed:
    check_fields(body, _CHAT)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array.", param="messages")
    tools = _tools(body.get("tools"))
    return _parsed(
        body,
        session_header,
        messages=[_message(m, i) for i, m in enumerate(messages)],
        response_format=_response_format(body.get("response_format")),
        tools=tools,
        tool_choice=_tool_choice(body.get("tool_choice"), tools),
        logprobs=_chat_logprobs(body),
    )


def _chat_logprobs(body: dict[str, Any]) -> int:
    """Chat's `logprobs` (a bool) and `top_logprobs` (how many alternatives) as the engine's count."""
    wanted = _typed(body, "logprobs", bool, False)
    top = body.get("top_logprobs")
    if top is None:
        return 0 if wanted else -1
    top = _number(top, "top_logprobs", int, 0, _MAX_TOP_LOGPROBS["chat"])
    if not wanted and top:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
    if not wanted:
        return -1
    return int(top)


_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")  # OpenAI's rule for function names (plus . and :)


def _tools(value: Any) -> list[dict[str, Any]]:
    """OpenAI's `tools`: function tools with a name and a JSON-schema object for parameters."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > _MAX_TOOLS:
        raise ApiError(400, f"'tools' must be an array of at most {_MAX_TOOLS} tools.", param="tools")
    out, names = [], set()
    for i, tool in enumerate(value):
        param = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ApiError(400, f"{param}: only tools of type 'function' are supported.", param=param)
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ApiError(400, f"{param}.function must be an object.", param=f"{param}.function")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ApiError(
                400,
                f"{param}.function.name must be 1-64 letters, digits, '_' or '-'.",
                param=f"{param}.function",
            )
        if name in names:
            raise ApiError(400, f"{param}: the function name {name!r} is used twice.", param=param)
        names.add(name)
        parameters = function.get("parameters")
        if parameters is not None and (
            not isinstance(parameters, dict) or parameters.get("type", "object") != "object"
        ):
            raise ApiError(
                400, f"{param}.function.parameters must be a JSON schema of an object.",
                param=f"{param}.function.parameters",
            )  # fmt: skip
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise ApiError(400, f"{param}.function.description must be a string.", param=f"{param}.function")
        clean: dict[str, Any] = {"name": name}
        if description:
            clean["description"] = description
        clean["parameters"] = parameters if parameters is not None else {"type": "object", "properties": {}}
        out.append({"type": "function", "function": clean})
    return out


def _tool_choice(value: Any, tools: list[dict[str, Any]]) -> str:
    """OpenAI's `tool_choice` as the engine takes it: auto, none, required or function:NAME."""
    if value is None:
        return "auto"
    if value in ("auto", "none", "required"):
        if value == "required" and not tools:
            raise ApiError(400, "tool_choice 'required' needs 'tools'.", param="tool_choice")
        return str(value)
    function = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise ApiError(
            400,
            "'tool_choice' must be 'auto', 'none', 'required' or "
            '{"type": "function", "function": {"name": ...}}.',
            param="tool_choice",
        )
    if name not in {t["function"]["name"] for t in tools}:
        raise ApiError(400, f"tool_choice names {name!r}, which is not among the tools.", param="tool_choice")
    return f"function:{name}"


def _response_format(value: Any) -> dict[str, Any]:
    """OpenAI's response_format, as the engine takes it: {} for text, or the JSON it must emit."""
    if value is None:
        return {}
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ApiError(
                400,
                "response_format.json_schema.schema must be a JSON schema object.",
                param="response_format",
            )
        return {"type": "json_schema", "schema": schema}
    raise ApiError(
        400, "'response_format' must be of type text, json_object or json_schema.", param="response_format"
    )


def parse_completion(body: dict[str, Any], session_header: str | None = None) -> Parsed:
    check_fields(body, _COMPLETION)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (or an array of one string).", param="prompt")
    count = body.get("logprobs")
    logprobs = -1 if count is None else _number(count, "logprobs", int, 0, _MAX_TOP_LOGPROBS["completion"])
    return _parsed(body, session_header, prompt=prompt, logprobs=logprobs)


def _message(m: Any, i: int) -> dict[str, Any]:
    param = f"messages[{i}]"
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise ApiError(400, f"{param} must be an object with a string 'role'.", param=param)
    if m["role"] not in ("system", "developer", "user", "assistant", "tool"):
        raise ApiError(400, f"{param}.role {m['role']!r} is not a known role.", param=f"{param}.role")
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text is supported
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, f"{param}.content: only text parts are supported.", param=f"{param}.content")
        content = "".join(texts)  # type: ignore[arg-type]
    if content is None and m["role"] == "assistant":
        content = ""
    if not isinstance(content, str):
        raise ApiError(
            400, f"{param}.content must be a string or an array of text parts.", param=f"{param}.content"
        )
    role = "system" if m["role"] == "developer" else m["role"]
    out: dict[str, Any] = {"role": role, "content": content}
    if m["role"] == "assistant" and m.get("tool_calls") is not None:
        out["tool_calls"] = _tool_calls(m["tool_calls"], param)
    if m["role"] == "tool":
        call_id = m.get("tool_call_id")
        if not isinstance(call_id, str):
            raise ApiError(400, f"{param}.tool_call_id must be a string.", param=f"{param}.tool_call_id")
        out["tool_call_id"] = call_id
    return out


def _tool_calls(calls: Any, param: str) -> list[dict[str, Any]]:
    """An assistant message's earlier `tool_calls`, checked and kept in OpenAI's shape."""
    if not isinstance(calls, list):
        raise ApiError(400, f"{param}.tool_calls must be an array.", param=f"{param}.tool_calls")
    out = []
    for j, call in enumerate(calls):
        where = f"{param}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments"), str)
            or not isinstance(call.get("id", ""), str)
        ):
            raise ApiError(
                400, f"{where} must have an 'id' and a 'function' with a 'name' and 'arguments' (a string).",
                param=where,
            )  # fmt: skip
        out.append(
            {
                "id": call.get("id", ""),
                "type": "function",
                "function": {"name": function["name"], "arguments": function["arguments"]},
            }
        )
    return out


def _parsed(body: dict[str, Any], session_header: str | None, **what: Any) -> Parsed:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' must be a non-empty string.", param="model")
    n = _number(_or(body, "n", 1), "n", int, 1, _MAX_N)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    stream = _typed(body, "stream", bool, False)
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise ApiError(
            400, "'stream_options' must be an object, and only with stream=true.", param="stream_options"
        )
    speculative = body.get("speculative") or ""
    if speculative not in ("", "off", "lookup", "draft"):
        raise ApiError(400, "'speculative' must be one of off, lookup or draft.", param="speculative")
    generate = Generate(
        request_id=uuid.uuid4().hex,
        model=model,
        max_tokens=_number(max_tokens, "max_tokens", int, 1, _INT64_MAX) if max_tokens is not None else None,
        temperature=_number(_or(body, "temperature", 1.0), "temperature", float, 0.0, 2.0),
        top_p=_number(_or(body, "top_p", 1.0), "top_p", float, 0.0, 1.0),
        top_k=_number(_or(body, "top_k", 0), "top_k", int, 0, 1_000_000),
        min_p=_number(_or(body, "min_p", 0.0), "min_p", float, 0.0, 1.0),
        presence_penalty=_number(_or(body, "presence_penalty", 0.0), "presence_penalty", float, -2.0, 2.0),
        frequency_penalty=_number(_or(body, "frequency_penalty", 0.0), "frequency_penalty", float, -2.0, 2.0),
        repeat_penalty=_number(_or(body, "repeat_penalty", 1.0), "repeat_penalty", float, 0.01, 10.0),
        logit_bias=_logit_bias(body.get("logit_bias")),
        seed=_number(body["seed"], "seed", int, _INT64_MIN, _INT64_MAX)
        if body.get("seed") is not None
        else None,
        stop=_stops(body.get("stop")),
        session=session_key(body, session_header, what),
        speculative=speculative,
        **what,
    )
    include_usage = bool(
        options and _typed(options, "include_usage", bool, False, "stream_options.include_usage")
    )
    parallel = _typed(body, "parallel_tool_calls", bool, True)
    return Parsed(
        generate=generate, stream=stream, include_usage=include_usage, n=n, parallel_tool_calls=parallel
    )


def _or(body: dict[str, Any], key: str, default: Any) -> Any:
    """An optional parameter: absent and `null` both mean the default (as in OpenAI's schema)."""
    value = body.get(key)
    return default if value is None else value


def _typed(body: dict[str, Any], key: str, kind: type, default: Any, param: str | None = None) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise ApiError(400, f"'{param or key}' must be a {kind.__name__}.", param=param or key)
    return value


def _number(value: Any, param: str, kind: type, low: float | None, high: float | None) -> Any:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and kind is int and isinstance(value, float) and not value.is_integer():
        ok = False
    if not ok:
        raise ApiError(400, f"'{param}' must be {'an integer' if kind is int else 'a number'}.", param=param)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ApiError(400, f"'{param}' must be {bounds}; got {value}.", param=param)
    return kind(value)


def _logit_bias(bias: Any) -> dict[str, float]:
    """OpenAI's logit_bias: token ids (as strings) to a bias in [-100, 100]."""
    if bias is None:
        return {}
    if not isinstance(bias, dict) or len(bias) > _MAX_LOGIT_BIAS:
        raise ApiError(
            400, f"'logit_bias' must be an object of at most {_MAX_LOGIT_BIAS} token ids.", param="logit_bias"
        )
    out = {}
    for key, value in bias.items():
        if not key.isdigit() or len(key) > 10:
            raise ApiError(400, f"'logit_bias' keys must be token ids; got {key!r}.", param="logit_bias")
        out[str(int(key))] = _number(value, f"logit_bias[{key}]", float, -100.0, 100.0)
    return out


def _stops(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > _MAX_STOPS:
        raise ApiError(
            400, f"'stop' must be a string or an array of up to {_MAX_STOPS} strings.", param="stop"
        )
    return stops


_MAX_INPUTS = 2048  # OpenAI's limit of inputs per embeddings request
_EMBEDDINGS = {"model", "input", "encoding_format", "user", "dimensions"}


@dataclass(frozen=True, slots=True)
class EmbeddingsRequest:
    model: str
    inputs: list[str]
    base64: bool


def parse_embeddings(body: dict[str, Any]) -> EmbeddingsRequest:
    """`/v1/embeddings`: a string or an array of strings to embed."""
    for key, value in body.items():
        if key not in _EMBEDDINGS:
            raise ApiError(400, f"Unrecognized request argument supplied: {key}", param=key)
        if key == "dimensions" and value is not None:
            raise ApiError(
                400,
                "'dimensions' is not supported: embeddings have the model's own size.",
                param="dimensions",
            )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' must be a non-empty string.", param="model")
    value = body.get("input")
    inputs = [value] if isinstance(value, str) else value
    if not isinstance(inputs, list) or not inputs or len(inputs) > _MAX_INPUTS:
        raise ApiError(
            400, f"'input' must be a string or an array of 1 to {_MAX_INPUTS} strings.", param="input"
        )
    if not all(isinstance(text, str) for text in inputs):
        raise ApiError(400, "'input' of token ids is not supported: send text.", param="input")
    if not all(inputs):
        raise ApiError(400, "'input' must not hold an empty string.", param="input")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise ApiError(400, "'encoding_format' must be float or base64.", param="encoding_format")
    return EmbeddingsRequest(model=model, inputs=inputs, base64=encoding == "base64")

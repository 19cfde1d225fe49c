"""Parsing OpenAI request bodies into a `Generate` and the response options around it."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

from actors import Generate
from gateway.http._errors import ApiError

_MAX_STOPS = 4
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # what the wire carries


@dataclass(frozen=True, slots=True)
class Parsed:
    """A valid request: what to ask the router, and how to shape the answer."""

    generate: Generate
    stream: bool
    include_usage: bool


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


def parse_chat(body: dict[str, Any], session_header: str | None = None) -> Parsed:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array.", param="messages")
    return _parsed(body, session_header, messages=[_message(m, i) for i, m in enumerate(messages)])


def parse_completion(body: dict[str, Any], session_header: str | None = None) -> Parsed:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (or an array of one string).", param="prompt")
    return _parsed(body, session_header, prompt=prompt)


def _message(m: Any, i: int) -> dict[str, str]:
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
    return {"role": role, "content": content}


def _parsed(body: dict[str, Any], session_header: str | None, **what: Any) -> Parsed:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' must be a non-empty string.", param="model")
    n = body.get("n")
    if n is not None and n != 1:
        raise ApiError(400, "Only n=1 is supported.", param="n")
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
    return Parsed(generate=generate, stream=stream, include_usage=include_usage)


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


def _stops(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > _MAX_STOPS:
        raise ApiError(
            400, f"'stop' must be a string or an array of up to {_MAX_STOPS} strings.", param="stop"
        )
    return stops

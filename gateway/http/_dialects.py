"""The other two APIs agents speak: OpenAI's Responses (`/v1/responses`) and Anthropic's Messages
(`/v1/messages`). Each request is translated into a chat request (so one parser checks every
field, and the same tools, grammars and sampling apply), generated like any other, and the
answer told in the dialect's own shapes and stream events.

Unsupported fields are refused by name, as on the chat endpoint; what the dialects have and chat
has not (stored responses, `previous_response_id`, reasoning, server tools) is refused too.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

import falcon
import falcon.asgi

from actors import Chunk, Finished, Started
from gateway.http._backend import Backend, EventStream
from gateway.http._errors import ApiError, to_api_error
from gateway.http._requests import Parsed, check_fields, parse_chat, read_json
from gateway.http._resources import ClosingStream, await_start, call_parser, next_event, read_body
from gateway.http._tools import Call, CallParser


@dataclass(slots=True)
class Turn:
    """What a generation amounted to, as it streams: text and calls, in order."""

    text: str = ""
    calls: list[Call] = field(default_factory=list)
    finished: Finished | None = None


async def _generate(backend: Backend, parsed: Parsed) -> tuple[EventStream, CallParser | None, Started]:
    events = backend.stream(parsed.generate)
    try:
        started = await await_start(events)
    except BaseException:
        await events.aclose()
        raise
    return events, call_parser(parsed, started), started


async def _pieces(events: EventStream, parser: CallParser | None, turn: Turn) -> AsyncGenerator[tuple, None]:
    """("text", str), ("call", Call), ("args", index, fragment) as they come; `turn` fills up."""
    while True:
        event = await next_event(events)
        if isinstance(event, Chunk):
            found = parser.feed(event.text) if parser is not None else None
            text = found.content if found is not None else event.text
        elif isinstance(event, Finished):
            found = parser.finish() if parser is not None else None
            text = found.content if found is not None else ""
        else:
            continue
        if text:
            turn.text += text
            yield ("text", text)
        if found is not None:
            for call in found.begun:
                turn.calls.append(call)
                yield ("call", call)
            for index, fragment in found.grown:
                yield ("args", index, fragment)
        if isinstance(event, Finished):
            turn.finished = event
            return


def _sse(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: ".encode() + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _tools(tools: Any, convert: Callable[[Any, str], dict[str, Any]]) -> list[dict[str, Any]]:
    """A dialect's tools as chat's (the chat parser then checks them as it checks its own)."""
    if not isinstance(tools, list):
        raise ApiError(400, "'tools' must be an array.", param="tools")
    return [convert(tool, f"tools[{i}]") for i, tool in enumerate(tools)]


def _text_of(content: Any, where: str, kinds: tuple[str, ...]) -> str:
    """A string, or an array of text parts of the given types, as one string."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") in kinds]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
            return "".join(texts)  # type: ignore[arg-type]
    raise ApiError(400, f"{where}: only text is supported ({', '.join(kinds)} parts).", param=where)


# -- OpenAI Responses ------------------------------------------------------------------------

_RESPONSES = {
    "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "stream",
    "max_output_tokens", "temperature", "top_p", "text", "metadata", "user", "store",
}  # fmt: skip
_RESPONSES_NOTHING: dict[str, Any] = {
    "previous_response_id": lambda v: False,
    "reasoning": lambda v: False,
    "include": lambda v: v == [],
    "truncation": lambda v: v == "disabled",
    "background": lambda v: v is False,
    "service_tier": lambda v: v in ("auto", "default"),
    "top_logprobs": lambda v: v == 0,
}


def responses_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses request as the chat request it amounts to."""
    check_fields(body, _RESPONSES, _RESPONSES_NOTHING)
    messages: list[dict[str, Any]] = []
    if body.get("instructions") is not None:
        messages.append({"role": "system", "content": _text_of(body["instructions"], "instructions", ())})
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise ApiError(400, "'input' must be a string or a non-empty array of items.", param="input")
    for i, item in enumerate(items):
        message = _response_item(item, f"input[{i}]", messages)
        if message:
            messages.append(message)
    chat: dict[str, Any] = {
        "model": body.get("model"),
        "messages": messages,
        "stream": body.get("stream"),
        "max_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "user": body.get("user"),
        "parallel_tool_calls": body.get("parallel_tool_calls"),
    }
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"], _response_tool)
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    chat["tool_choice"] = choice
    text = body.get("text")
    if text is not None:
        fmt = text.get("format") if isinstance(text, dict) else None
        if not isinstance(fmt, dict):
            raise ApiError(400, "'text.format' must be an object.", param="text.format")
        if fmt.get("type") == "json_schema":
            chat["response_format"] = {"type": "json_schema", "json_schema": {"schema": fmt.get("schema")}}
        else:
            chat["response_format"] = {"type": fmt.get("type")}
    return chat


def _response_item(item: Any, where: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ApiError(400, f"{where} must be an object.", param=where)
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise ApiError(400, f"{where}.role must be user, assistant, system or developer.", param=where)
        content = _text_of(item.get("content"), f"{where}.content", ("input_text", "output_text"))
        return {"role": role, "content": content}
    if kind == "function_call":
        call = {
            "id": item.get("call_id"),
            "type": "function",
            "function": {"name": item.get("name"), "arguments": item.get("arguments")},
        }
        last = messages[-1] if messages else None
        if last is not None and last.get("role") == "assistant" and last.get("tool_calls") is not None:
            last["tool_calls"].append(call)  # parallel calls: one assistant turn
            return {}
        return {"role": "assistant", "content": None, "tool_calls": [call]}
    if kind == "function_call_output":
        output = item.get("output")
        return {"role": "tool", "tool_call_id": item.get("call_id"), "content": output}
    raise ApiError(400, f"{where}: items of type {kind!r} are not supported.", param=where)


def _response_tool(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise ApiError(400, f"{where}: only tools of type 'function' are supported.", param=where)
    function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
    return {"type": "function", "function": function}


class _Dialect:
    """The flow both dialects share: translate, generate, answer whole or as a stream."""

    def __init__(self, backend: Backend, max_body_bytes: int) -> None:
        self.backend = backend
        self.max_body_bytes = max_body_bytes

    def to_chat(self, body: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def head(self, parsed: Parsed) -> dict[str, Any]:
        raise NotImplementedError

    def answer(self, head: dict[str, Any], turn: Turn) -> dict[str, Any]:
        raise NotImplementedError

    def stream(
        self, events: EventStream, parser: CallParser | None, head: dict[str, Any], started: Started
    ) -> AsyncGenerator[bytes, None]:
        raise NotImplementedError

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = read_json(await read_body(req, self.max_body_bytes))
        parsed = parse_chat(self.to_chat(body), req.get_header("X-Session-Id"))
        events, parser, started = await _generate(self.backend, parsed)
        req.context.mesh_node = started.node_id
        head = self.head(parsed)
        if parsed.stream:
            resp.content_type = "text/event-stream"
            resp.set_header("Cache-Control", "no-cache")
            resp.stream = ClosingStream(self.stream(events, parser, head, started))  # type: ignore[assignment]
            return
        turn = Turn()
        try:
            async for _ in _pieces(events, parser, turn):
                pass
        finally:
            await events.aclose()
        resp.media = self.answer(head, turn)


class Responses(_Dialect):
    """`POST /v1/responses`: text, function tools and structured output; streamed as events."""

    def to_chat(self, body: dict[str, Any]) -> dict[str, Any]:
        return responses_to_chat(body)

    def head(self, parsed: Parsed) -> dict[str, Any]:
        rid = "resp_" + parsed.generate.request_id
        return {
            "id": rid,
            "object": "response",
            "created_at": int(time.time()),
            "model": parsed.generate.model,
        }

    def answer(self, head: dict[str, Any], turn: Turn) -> dict[str, Any]:
        return _response(head, turn, _items(turn))

    async def stream(
        self, events: EventStream, parser: CallParser | None, head: dict[str, Any], started: Started
    ) -> AsyncGenerator[bytes, None]:
        seq = 0

        def event(kind: str, **data: Any) -> bytes:
            nonlocal seq
            seq += 1
            return _sse(kind, {"type": kind, "sequence_number": seq - 1, **data})

        turn = Turn()
        message_id = "msg_" + uuid.uuid4().hex[:24]
        item_of: dict[int, int] = {}  # call index -> output index
        message_at: int | None = None
        output: list[dict[str, Any]] = []
        try:
            shell = _response(head, turn, [], status="in_progress")
            yield event("response.created", response=shell)
            yield event("response.in_progress", response=shell)
            async for piece in _pieces(events, parser, turn):
                if piece[0] == "text":
                    if message_at is None:
                        message_at = len(output)
                        output.append(_message_item(message_id, "", "in_progress"))
                        yield event("response.output_item.added", output_index=message_at, item=output[-1])
                        yield event(
                            "response.content_part.added", item_id=message_id, output_index=message_at,
                            content_index=0, part={"type": "output_text", "text": "", "annotations": []},
                        )  # fmt: skip
                    yield event(
                        "response.output_text.delta", item_id=message_id, output_index=message_at,
                        content_index=0, delta=piece[1],
                    )  # fmt: skip
                elif piece[0] == "call":
                    call = piece[1]
                    item_of[call.index] = len(output)
                    output.append(_call_item(call, "", "in_progress"))
                    yield event("response.output_item.added", output_index=len(output) - 1, item=output[-1])
                else:
                    _, index, fragment = piece
                    item = output[item_of[index]]
                    item["arguments"] += fragment
                    yield event(
                        "response.function_call_arguments.delta", item_id=item["id"],
                        output_index=item_of[index], delta=fragment,
                    )  # fmt: skip
            if message_at is not None:
                part = {"type": "output_text", "text": turn.text, "annotations": []}
                yield event(
                    "response.output_text.done", item_id=message_id, output_index=message_at,
                    content_index=0, text=turn.text,
                )  # fmt: skip
                yield event(
                    "response.content_part.done", item_id=message_id, output_index=message_at,
                    content_index=0, part=part,
                )  # fmt: skip
                output[message_at] = _message_item(message_id, turn.text, "completed")
                yield event("response.output_item.done", output_index=message_at, item=output[message_at])
            for call in turn.calls:
                at = item_of[call.index]
                output[at] = _call_item(call, call.arguments, "completed", output[at]["id"])
                yield event(
                    "response.function_call_arguments.done", item_id=output[at]["id"], output_index=at,
                    arguments=call.arguments,
                )  # fmt: skip
                yield event("response.output_item.done", output_index=at, item=output[at])
            yield event("response.completed", response=_response(head, turn, output))
        except Exception as err:
            yield event("error", message=to_api_error(err).body["error"]["message"])
        finally:
            await events.aclose()


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _call_item(call: Call, arguments: str, status: str, item_id: str | None = None) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id or "fc_" + uuid.uuid4().hex[:24],
        "call_id": call.id,
        "name": call.name,
        "arguments": arguments,
        "status": status,
    }


def _items(turn: Turn) -> list[dict[str, Any]]:
    out = [_message_item("msg_" + uuid.uuid4().hex[:24], turn.text, "completed")] if turn.text else []
    return out + [_call_item(c, c.arguments, "completed") for c in turn.calls]


def _response(
    head: dict[str, Any], turn: Turn, output: list[dict[str, Any]], status: str | None = None
) -> dict[str, Any]:
    done = turn.finished
    cut = done is not None and done.finish_reason == "length"
    usage = None
    if done is not None:
        usage = {
            "input_tokens": done.prompt_tokens,
            "output_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        }
    return {
        **head,
        "status": status or ("incomplete" if cut else "completed"),
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
    }


# -- Anthropic Messages ----------------------------------------------------------------------

_MESSAGES = {
    "model", "messages", "system", "max_tokens", "stream", "temperature", "top_p", "top_k",
    "stop_sequences", "tools", "tool_choice", "metadata",
}  # fmt: skip
_MESSAGES_NOTHING: dict[str, Any] = {
    "thinking": lambda v: isinstance(v, dict) and v.get("type") == "disabled",
    "service_tier": lambda v: v in ("auto", "standard_only"),
}
_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def messages_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Messages request as the chat request it amounts to."""
    check_fields(body, _MESSAGES, _MESSAGES_NOTHING)
    if not isinstance(body.get("max_tokens"), int) or isinstance(body.get("max_tokens"), bool):
        raise ApiError(400, "max_tokens: Field required (an integer).", param="max_tokens")
    messages: list[dict[str, Any]] = []
    if body.get("system") is not None:
        messages.append({"role": "system", "content": _text_of(body["system"], "system", ("text",))})
    turns = body.get("messages")
    if not isinstance(turns, list) or not turns:
        raise ApiError(400, "'messages' must be a non-empty array.", param="messages")
    for i, turn in enumerate(turns):
        messages += _anthropic_turn(turn, f"messages[{i}]")
    chat: dict[str, Any] = {
        "model": body.get("model"),
        "messages": messages,
        "max_tokens": body["max_tokens"],
        "stream": body.get("stream"),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "top_k": body.get("top_k"),
        "stop": body.get("stop_sequences"),
    }
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"], _anthropic_tool)
    choice = body.get("tool_choice")
    if choice is not None:
        kind = choice.get("type") if isinstance(choice, dict) else None
        mapped = {"auto": "auto", "any": "required", "none": "none"}.get(kind or "")
        if kind == "tool":
            mapped = {"type": "function", "function": {"name": choice.get("name")}}  # type: ignore[assignment]
        if mapped is None:
            raise ApiError(400, "tool_choice.type must be auto, any, tool or none.", param="tool_choice")
        chat["tool_choice"] = mapped
    return chat


def _anthropic_turn(turn: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant"):
        raise ApiError(400, f"{where}.role must be user or assistant.", param=f"{where}.role")
    content = turn.get("content")
    if isinstance(content, str):
        return [{"role": turn["role"], "content": content}]
    if not isinstance(content, list):
        raise ApiError(
            400, f"{where}.content must be a string or an array of blocks.", param=f"{where}.content"
        )
    text, calls, results = "", [], []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            text += block["text"]
        elif kind == "tool_use" and turn["role"] == "assistant":
            arguments = json.dumps(block.get("input") or {})
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": arguments},
                }
            )
        elif kind == "tool_result" and turn["role"] == "user":
            result = block.get("content", "")
            result = (
                result
                if isinstance(result, str)
                else _text_of(result, f"{where}.content[{j}].content", ("text",))
            )
            results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": result})
        else:
            raise ApiError(
                400,
                f"{where}.content[{j}]: blocks of type {kind!r} are not supported here.",
                param=f"{where}.content[{j}]",
            )
    out: list[dict[str, Any]] = list(results)
    if calls:
        out.append({"role": "assistant", "content": text or None, "tool_calls": calls})
    elif text or not results:
        out.append({"role": turn["role"], "content": text})
    return out


def _anthropic_tool(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type", "custom") != "custom":
        raise ApiError(400, f"{where}: only custom (client) tools are supported.", param=where)
    function: dict[str, Any] = {"name": tool.get("name"), "parameters": tool.get("input_schema")}
    if tool.get("description") is not None:
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


class Messages(_Dialect):
    """`POST /v1/messages`: Anthropic's API (text, streaming, client tools)."""

    def to_chat(self, body: dict[str, Any]) -> dict[str, Any]:
        return messages_to_chat(body)

    def head(self, parsed: Parsed) -> dict[str, Any]:
        rid, model = "msg_" + parsed.generate.request_id, parsed.generate.model
        return {"id": rid, "type": "message", "role": "assistant", "model": model}

    def answer(self, head: dict[str, Any], turn: Turn) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "text", "text": turn.text}] if turn.text else []
        content += [_tool_use(c, _object(c.arguments)) for c in turn.calls]
        return {**head, "content": content, **_stop(turn)}

    async def stream(
        self, events: EventStream, parser: CallParser | None, head: dict[str, Any], started: Started
    ) -> AsyncGenerator[bytes, None]:
        turn = Turn()
        block = -1  # the open content block's index
        text_open = False
        block_of: dict[int, int] = {}  # call index -> block index
        try:
            usage = {"input_tokens": started.prompt_tokens, "output_tokens": 0}
            start = {**head, "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}
            yield _sse("message_start", {"type": "message_start", "message": start})
            yield _sse("ping", {"type": "ping"})
            async for piece in _pieces(events, parser, turn):
                if piece[0] == "args":
                    _, index, fragment = piece
                    yield _block(
                        "delta", block_of[index], {"type": "input_json_delta", "partial_json": fragment}
                    )
                    continue
                if piece[0] == "call" or not text_open:  # a new block begins
                    if block >= 0:
                        yield _block("stop", block)
                    block += 1
                    text_open = piece[0] == "text"
                    if piece[0] == "call":
                        block_of[piece[1].index] = block
                    opened = {"type": "text", "text": ""} if text_open else _tool_use(piece[1], {})
                    yield _block("start", block, opened)
                if piece[0] == "text":
                    yield _block("delta", block, {"type": "text_delta", "text": piece[1]})
            if block >= 0:
                yield _block("stop", block)
            stop = _stop(turn)
            yield _sse("message_delta", {
                "type": "message_delta",
                "delta": {"stop_reason": stop["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": stop["usage"]["output_tokens"]},
            })  # fmt: skip
            yield _sse("message_stop", {"type": "message_stop"})
        except Exception as err:
            yield _sse("error", anthropic_error(to_api_error(err)))
        finally:
            await events.aclose()


def _block(what: str, index: int, data: dict[str, Any] | None = None) -> bytes:
    """content_block_start / _delta / _stop."""
    kind = f"content_block_{what}"
    body: dict[str, Any] = {"type": kind, "index": index}
    if what == "start":
        body["content_block"] = data
    elif what == "delta":
        body["delta"] = data
    return _sse(kind, body)


def _tool_use(call: Call, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "tool_use",
        "id": "toolu_" + call.id.removeprefix("call_"),
        "name": call.name,
        "input": arguments,
    }


def _object(text: str) -> dict[str, Any]:
    """A call's arguments as the object Anthropic's `input` is ({} if they do not parse as one)."""
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _stop(turn: Turn) -> dict[str, Any]:
    done = turn.finished
    assert done is not None
    reason = "tool_calls" if turn.calls and done.finish_reason == "stop" else done.finish_reason
    return {
        "stop_reason": _STOP.get(reason, "end_turn"),
        "stop_sequence": None,
        "usage": {"input_tokens": done.prompt_tokens, "output_tokens": done.completion_tokens},
    }


_ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
}  # fmt: skip


def anthropic_error(api: ApiError) -> dict[str, Any]:
    """An error as Anthropic's API shapes it."""
    kind = _ANTHROPIC_TYPES.get(api.status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": api.body["error"]["message"]}}

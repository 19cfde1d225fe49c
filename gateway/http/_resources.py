"""HTTP resources: each parses, calls the backend, and formats the answer (OpenAI shapes).

Responders are coroutines on the worker's event loop. A client that disconnects cancels its
request at once, streaming or not: `WatchDisconnect` cancels the request's task, which closes
the backend stream.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
import uuid
from base64 import b64encode
from collections.abc import AsyncGenerator
from dataclasses import replace
from typing import Any

import falcon
import falcon.asgi

from actors import (
    Accepted,
    Chunk,
    EngineFailed,
    Finished,
    Generate,
    Message,
    ModelNotFound,
    RequestError,
    Started,
    TokenLogprob,
)
from gateway.http._backend import Backend, EventStream
from gateway.http._errors import ApiError, to_api_error
from gateway.http._requests import Parsed, parse_chat, parse_completion, parse_embeddings, read_json
from gateway.http._tools import Call, CallParser, Found


class Health:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        try:
            ready = (await self.backend.query("health"))["ready"]
        except RequestError as err:
            resp.status, resp.media = 503, {"status": "unavailable", "detail": str(err)}
            return
        resp.status = 200 if ready else 503
        resp.media = {"status": "ok"} if ready else {"status": "loading"}

    async def on_head(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        await self.on_get(req, resp)


class Models:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        models = (await self.backend.query("models"))["models"]
        resp.media = {"object": "list", "data": [_model(m) for m in models]}

    async def on_get_model(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, model_id: str) -> None:
        """`GET /v1/models/{id}`: the model if the mesh serves it, else OpenAI's 404."""
        models = (await self.backend.query("models"))["models"]
        if model_id not in models:
            raise ModelNotFound(f"The model '{model_id}' does not exist on this mesh", param="model")
        resp.media = _model(model_id)


def _model(model_id: str) -> dict[str, object]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "mesh-llm"}


async def await_start(events: EventStream) -> Started:
    """The stream's `Accepted` then `Started` (stamped with the generating node's id)."""
    accepted, started = await next_event(events), await next_event(events)
    if not isinstance(accepted, Accepted) or not isinstance(started, Started):
        raise EngineFailed(f"the node answered out of order ({type(accepted).__name__} first)")
    return started if started.node_id else replace(started, node_id=accepted.node_id)


async def next_event(events: EventStream) -> Message:
    """The stream's next event; `EngineFailed` if it ended without finishing."""
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        raise EngineFailed("the node ended the response without finishing it") from None


class ClosingStream:
    """An async generator as `Response.stream`: falcon closes a stream through `close()` (which
    async generators lack) when it ends, fails or its task is cancelled, and closing ours closes
    the backend stream, which cancels the request."""

    def __init__(self, body: AsyncGenerator[bytes, None]) -> None:
        self.body = body

    def __aiter__(self) -> AsyncGenerator[bytes, None]:
        return self.body

    async def close(self) -> None:
        await self.body.aclose()


class _Completions:
    """Shared flow of the two generation endpoints; subclasses shape the bodies."""

    prefix = ""
    object_name = ""
    chunk_object = ""

    def __init__(self, backend: Backend, max_body_bytes: int) -> None:
        self.backend = backend
        self.max_body_bytes = max_body_bytes

    def parse(self, body: dict[str, Any], session_header: str | None) -> Parsed:
        raise NotImplementedError

    def choice(
        self, text: str, finish: str | None, calls: list[Call], logprobs: list[TokenLogprob] | None
    ) -> dict[str, Any]:
        raise NotImplementedError

    def delta(
        self,
        text: str,
        first: bool,
        finish: str | None,
        logprobs: list[TokenLogprob] | None = None,
        offset: int = 0,
    ) -> dict[str, Any]:
        """A stream chunk's choice; `offset`: characters of the text sent before it."""
        raise NotImplementedError

    def call_deltas(self, found: Found, first: bool) -> list[dict[str, Any]]:
        """The stream's choices for calls begun and grown (chat only)."""
        return []

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        raw = await read_body(req, self.max_body_bytes)
        parsed = self.parse(read_json(raw), req.get_header("X-Session-Id"))
        # n choices are n requests, placed and generated like any (a seed gives each its own).
        asks = [parsed.generate] + [
            replace(
                parsed.generate,
                request_id=uuid.uuid4().hex,
                seed=None if parsed.generate.seed is None else parsed.generate.seed + i,
            )
            for i in range(1, parsed.n)
        ]
        streams = [self.backend.stream(ask) for ask in asks]
        streaming = False  # once the body streams, falcon owns the streams (and closes them)
        try:
            parsers = []
            for events in streams:
                started = await await_start(events)
                req.context.mesh_node = started.node_id  # who generates it
                parsers.append(call_parser(parsed, started))
            meta = {
                "id": f"{self.prefix}-{parsed.generate.request_id}",
                "created": int(time.time()),
                "model": parsed.generate.model,
            }
            if parsed.stream:
                resp.content_type = "text/event-stream"
                resp.set_header("Cache-Control", "no-cache")
                resp.stream = ClosingStream(self.sse(streams, meta, parsed, parsers))  # type: ignore[assignment]
                streaming = True
                return
            want = parsed.generate.logprobs >= 0
            pairs = zip(streams, parsers, strict=True)
            answers = await asyncio.gather(*(self.whole(events, parser, want) for events, parser in pairs))
            choices = [{**choice, "index": i} for i, (choice, _) in enumerate(answers)]
            done = [finished for _, finished in answers]
            resp.media = {**meta, "object": self.object_name, "choices": choices, "usage": usage(*done)}
        finally:  # done, failed, or the client gone (this task cancelled): they end here
            if not streaming:
                for events in streams:
                    await events.aclose()

    async def whole(
        self, events: EventStream, parser: CallParser | None, want_logprobs: bool
    ) -> tuple[dict[str, Any], Finished]:
        text: list[str] = []
        logprobs: list[TokenLogprob] | None = [] if want_logprobs else None
        while True:
            event = await next_event(events)
            if isinstance(event, Chunk):
                text.append(event.text)
                if logprobs is not None:
                    logprobs += event.logprobs
            elif isinstance(event, Finished):
                content, calls = "".join(text), []
                if parser is not None:
                    found = parser.feed(content)
                    content = found.content + parser.finish().content
                    calls = parser.calls
                finish = _finish_reason(event.finish_reason, calls)
                return self.choice(content, finish, calls, logprobs), event

    async def sse(
        self,
        streams: list[EventStream],
        meta: dict[str, Any],
        parsed: Parsed,
        parsers: list[CallParser | None],
    ) -> AsyncGenerator[bytes, None]:
        """The SSE body, the choices' chunks as they come; an error after the headers went out
        becomes an `error` event."""
        base = {**meta, "object": self.chunk_object}
        usage_null = {"usage": None} if parsed.include_usage else {}
        queue: asyncio.Queue[tuple[int, dict[str, Any] | Finished | Exception]] = asyncio.Queue()

        async def pump(index: int, events: EventStream, parser: CallParser | None) -> None:
            try:
                async for item in self.deltas(events, parsed, parser):
                    await queue.put((index, item))
            except Exception as err:
                await queue.put((index, err))

        pumps = [
            asyncio.ensure_future(pump(i, e, p))
            for i, (e, p) in enumerate(zip(streams, parsers, strict=True))
        ]
        finished: list[Finished] = []
        try:
            while len(finished) < len(streams):
                index, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if isinstance(item, Finished):
                    finished.append(item)
                    continue
                yield _sse({**base, "choices": [{**item, "index": index}], **usage_null})
            if parsed.include_usage:
                yield _sse({**base, "choices": [], "usage": usage(*finished)})
            yield b"data: [DONE]\n\n"
        except Exception as err:
            yield b"event: error\ndata: " + json.dumps(to_api_error(err).body).encode() + b"\n\n"
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for events in streams:
                await events.aclose()

    async def deltas(
        self, events: EventStream, parsed: Parsed, parser: CallParser | None
    ) -> AsyncGenerator[dict[str, Any] | Finished, None]:
        """One choice's stream: its chunk choices (index 0), then its `Finished`."""
        first, offset = True, 0
        held: list[TokenLogprob] | None = [] if parsed.generate.logprobs >= 0 else None  # not yet sent
        while True:
            event = await next_event(events)
            if isinstance(event, Chunk) and held is not None:
                held += event.logprobs
            if isinstance(event, Chunk) and parser is not None:
                for choice in self.call_deltas(parser.feed(event.text), first):
                    yield choice
                    first = False
            elif isinstance(event, Chunk):
                if not event.text and not first and not held:
                    continue
                yield self.delta(event.text, first, None, held, offset)
                offset += sum(len(_token(lp.piece)) for lp in held or [])
                first, held = False, [] if held is not None else None
            elif isinstance(event, Finished):
                calls: list[Call] = []
                if parser is not None:
                    for choice in self.call_deltas(parser.finish(), first):
                        yield choice
                        first = False
                    calls = parser.calls
                yield self.delta("", first, _finish_reason(event.finish_reason, calls), held, offset)
                yield event
                return


class Embeddings:
    """`/v1/embeddings`: each input is a request of its own, placed like any other (on this node
    or a peer serving the model), all at once."""

    def __init__(self, backend: Backend, max_body_bytes: int) -> None:
        self.backend = backend
        self.max_body_bytes = max_body_bytes

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        asked = parse_embeddings(read_json(await read_body(req, self.max_body_bytes)))
        tasks = [asyncio.ensure_future(self._one(asked.model, text)) for text in asked.inputs]
        try:
            done = await asyncio.gather(*tasks)
        finally:  # one failed or the client left: the others stop too
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        data = [
            {"object": "embedding", "index": i, "embedding": _vector(f.embedding, asked.base64)}
            for i, f in enumerate(done)
        ]
        tokens = sum(f.prompt_tokens for f in done)
        resp.media = {
            "object": "list",
            "data": data,
            "model": asked.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def _one(self, model: str, text: str) -> Finished:
        generate = Generate(request_id=uuid.uuid4().hex, model=model, prompt=text, embed=True)
        events = self.backend.stream(generate)
        try:
            while True:
                event = await next_event(events)
                if isinstance(event, Finished):
                    if not event.embedding:
                        raise EngineFailed("the node answered an embedding request without an embedding")
                    return event
        finally:
            await events.aclose()


def _vector(values: list[float], base64: bool) -> list[float] | str:
    """An embedding as OpenAI sends it: floats, or base64 of little-endian float32s."""
    if not base64:
        return values
    return b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


class ChatCompletions(_Completions):
    prefix, object_name, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def parse(self, body: dict[str, Any], session_header: str | None) -> Parsed:
        return parse_chat(body, session_header)

    def choice(
        self, text: str, finish: str | None, calls: list[Call], logprobs: list[TokenLogprob] | None
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message["content"] = text or None
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in calls
            ]
        return {"index": 0, "message": message, "logprobs": _chat_logprobs(logprobs), "finish_reason": finish}

    def call_deltas(self, found: Found, first: bool) -> list[dict[str, Any]]:
        out = []
        if found.content:
            out.append(self.delta(found.content, first, None))
            first = False
        for call in found.begun:
            header = {
                "index": call.index,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            role: dict[str, Any] = {"role": "assistant", "content": None} if first else {}
            out.append(_call_delta({**role, "tool_calls": [header]}))
            first = False
        for index, fragment in found.grown:
            out.append(_call_delta({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}))
        return out

    def delta(
        self,
        text: str,
        first: bool,
        finish: str | None,
        logprobs: list[TokenLogprob] | None = None,
        offset: int = 0,
    ) -> dict[str, Any]:
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
        if finish is not None:
            delta = {"role": "assistant", "content": ""} if first else {}
        lp = _chat_logprobs(logprobs) if logprobs else None
        return {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}


class Completions(_Completions):
    prefix, object_name, chunk_object = "cmpl", "text_completion", "text_completion"

    def parse(self, body: dict[str, Any], session_header: str | None) -> Parsed:
        return parse_completion(body, session_header)

    def choice(
        self, text: str, finish: str | None, calls: list[Call], logprobs: list[TokenLogprob] | None
    ) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": _completion_logprobs(logprobs), "finish_reason": finish}

    def delta(
        self,
        text: str,
        first: bool,
        finish: str | None,
        logprobs: list[TokenLogprob] | None = None,
        offset: int = 0,
    ) -> dict[str, Any]:
        lp = _completion_logprobs(logprobs, offset)
        return {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}


def _token(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def _chat_logprobs(logprobs: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """Chat's `logprobs` object: each token with its bytes and its likeliest alternatives."""
    if logprobs is None:
        return None
    return {
        "content": [
            {
                "token": _token(lp.piece),
                "logprob": lp.logprob,
                "bytes": list(lp.piece),
                "top_logprobs": [
                    {"token": _token(t.piece), "logprob": t.logprob, "bytes": list(t.piece)} for t in lp.top
                ],
            }
            for lp in logprobs
        ],
        "refusal": None,
    }


def _completion_logprobs(logprobs: list[TokenLogprob] | None, offset: int = 0) -> dict[str, Any] | None:
    """The legacy completions' `logprobs` object (parallel lists)."""
    if logprobs is None:
        return None
    offsets, at = [], offset
    for lp in logprobs:
        offsets.append(at)
        at += len(_token(lp.piece))
    return {
        "tokens": [_token(lp.piece) for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{_token(t.piece): t.logprob for t in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


def call_parser(parsed: Parsed, started: Started) -> CallParser | None:
    """A parser of tool calls when the request offered tools the model may call."""
    generate = parsed.generate
    if not generate.tools or generate.tool_choice == "none" or not started.tool_syntax:
        return None
    return CallParser(started.tool_syntax, single=not parsed.parallel_tool_calls)


def _call_delta(delta: dict[str, Any]) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}


def _finish_reason(reason: str, calls: list[Call]) -> str:
    return "tool_calls" if calls and reason == "stop" else reason


def usage(done: Finished, *more: Finished) -> dict[str, Any]:
    """OpenAI's usage object (of all the choices: the prompt counted once); with speculative
    decoding, an extension `speculative` object (of the first choice)."""
    completion = done.completion_tokens + sum(d.completion_tokens for d in more)
    out: dict[str, Any] = {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": done.prompt_tokens + completion,
    }
    if done.drafter:
        rate = done.accepted_tokens / done.drafted_tokens if done.drafted_tokens else None
        out["speculative"] = {
            "drafter": done.drafter,
            "drafted_tokens": done.drafted_tokens,
            "accepted_tokens": done.accepted_tokens,
            "acceptance_rate": round(rate, 4) if rate is not None else None,
        }
    return out


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def read_body(req: falcon.asgi.Request, limit: int) -> bytes:
    """The request body, with or without Content-Length (chunked), or 413 past `limit` bytes."""
    if req.content_length is not None and req.content_length > limit:
        raise ApiError(
            413,
            f"Request body of {req.content_length} bytes exceeds the limit of {limit} bytes.",
            code="request_too_large",
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in req.stream:
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"Request body exceeds the limit of {limit} bytes.", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)

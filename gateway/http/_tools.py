"""Tool calls, the gateway's half: finding the calls in generated text as it streams, in the
syntax the engine said the model writes (`Started.tool_syntax`; see `actors/engine/_tools.py`).

A `CallParser` is fed text as it arrives and answers events: text that is content, a call that
begins (its id and name), fragments of its arguments, and the end of a call. In the `hermes`
syntax the arguments stream as they are generated; `llama3` and `mistral` calls are the whole
reply, so they are known when it ends. Text that looked like a call but does not parse as one is
given back as content, never dropped.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
# What may end a call's arguments and is not theirs: the call's `}` and the start of `</tool_call>`.
_TAIL = re.compile(r"\s*\}?\s*(?:<(?:/(?:t(?:o(?:o(?:l(?:_(?:c(?:a(?:l(?:l(?:>)?)?)?)?)?)?)?)?)?)?)?)?$")


@dataclass(slots=True)
class Call:
    index: int  # its place among the reply's calls
    id: str
    name: str
    arguments: str = ""  # a JSON text, as OpenAI gives it


@dataclass(slots=True)
class Found:
    """What a piece of text amounted to, in order: content, then calls begun and grown."""

    content: str = ""
    begun: list[Call] = field(default_factory=list)  # calls begun: their id and name are known
    grown: list[tuple[int, str]] = field(default_factory=list)  # (call index, arguments fragment)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class CallParser:
    def __init__(self, syntax: str, single: bool = False) -> None:
        """`single`: one call at most (`parallel_tool_calls: false`); later ones are dropped."""
        self.syntax = syntax
        self.single = single
        self.calls: list[Call] = []
        self._buffer = ""  # text not yet given out
        self._in_call = False  # hermes: inside <tool_call>
        self._open: Call | None = None  # hermes: the call whose arguments are streaming
        self._sent = 0  # hermes: characters of its arguments given out
        self._whole = syntax in ("llama3", "mistral")  # the reply may be one call, known at the end
        self._decided = not self._whole  # llama3/mistral: whether the reply is a call

    def feed(self, text: str) -> Found:
        self._buffer += text
        return self._hermes(final=False) if self.syntax == "hermes" else self._whole_reply(final=False)

    def finish(self) -> Found:
        return self._hermes(final=True) if self.syntax == "hermes" else self._whole_reply(final=True)

    # -- hermes: <tool_call>{json}</tool_call>, anywhere in the reply, any number of them

    def _hermes(self, final: bool) -> Found:
        out = Found()
        while True:
            if not self._in_call:
                at = self._buffer.find(_OPEN)
                if at < 0:
                    keep = 0 if final else _partial_suffix(self._buffer, _OPEN)
                    if self.calls and not final and not self._buffer.strip():
                        keep = len(self._buffer)  # maybe the gap before another call
                    text = self._buffer[: len(self._buffer) - keep]
                    out.content += text if text.strip() or not self.calls else ""
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return out
                before = self._buffer[:at]
                out.content += before if before.strip() or not self.calls else ""  # not the gaps
                self._buffer = self._buffer[at + len(_OPEN) :]
                self._in_call, self._open, self._sent = True, None, 0
                continue
            end = self._buffer.find(_CLOSE)
            body = self._buffer if end < 0 else self._buffer[:end]
            if self.single and self.calls and self._open is None:  # a second call: dropped
                if end < 0 and not final:
                    return out
                self._buffer = "" if end < 0 else self._buffer[end + len(_CLOSE) :]
                self._in_call = False
                if end < 0:
                    return out
                continue
            header = _HEADER.match(body)
            if header and self._open is None:
                self._open = Call(len(self.calls), new_call_id(), _unescape(header.group(1)))
                self.calls.append(self._open)
                out.begun.append(self._open)
            if end < 0 and not final:
                if header:  # stream what is surely arguments, holding back what may end them
                    args = body[header.end() :]
                    tail = _TAIL.search(args)
                    sure = len(args) - (len(tail.group(0)) if tail else 0)
                    if sure > self._sent:
                        out.grown.append((len(self.calls) - 1, args[self._sent : sure]))
                        self._sent = sure
                return out
            # The call is complete, or the reply ended inside it.
            self._buffer = "" if end < 0 else self._buffer[end + len(_CLOSE) :]
            self._in_call = False
            if self._open is not None and header:
                arguments = body[header.end() :].rstrip()
                arguments = arguments.removesuffix("}").rstrip()
                if len(arguments) > self._sent:
                    out.grown.append((len(self.calls) - 1, arguments[self._sent :]))
                self._open.arguments = arguments
                self._open = None
            else:
                parsed = _parse_call(body, "arguments")
                if parsed is None:  # not a call after all: it was content
                    out.content += _OPEN + body + ("" if end < 0 else _CLOSE)
                else:
                    self.calls.append(Call(len(self.calls), new_call_id(), parsed[0], parsed[1]))
                    out.begun.append(self.calls[-1])
                    out.grown.append((len(self.calls) - 1, parsed[1]))
            if end < 0:
                return out

    # -- llama3 / mistral: the whole reply is the call(s)

    def _whole_reply(self, final: bool) -> Found:
        out = Found()
        if not self._decided:
            head = self._buffer.lstrip()
            head = head.removeprefix("<|python_tag|>").removeprefix("[TOOL_CALLS]").lstrip()
            if not final and any(m.startswith(head) for m in ("<|python_tag|>", "[TOOL_CALLS]")):
                return out  # empty, or a marker not yet whole
            opener = "[" if self.syntax == "mistral" else "{"
            self._decided = True
            self._whole = head.startswith(opener) or head.startswith("{")
        if not self._whole:
            out.content, self._buffer = self._buffer, ""
            return out
        if not final:
            return out
        calls = _parse_reply(self._buffer, self.syntax)
        if calls is not None and self.single:
            calls = calls[:1]
        if calls is None:
            out.content, self._buffer = self._buffer, ""
            return out
        for name, arguments in calls:
            self.calls.append(Call(len(self.calls), new_call_id(), name, arguments))
            out.begun.append(self.calls[-1])
            out.grown.append((len(self.calls) - 1, arguments))
        self._buffer = ""
        return out


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _unescape(json_string_body: str) -> str:
    try:
        return str(json.loads(f'"{json_string_body}"'))
    except ValueError:
        return json_string_body


def _parse_call(text: str, key: str) -> tuple[str, str] | None:
    """`{"name": ..., key: {...}}` as (name, arguments as JSON text), or None."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return _as_call(value, key)


def _as_call(value: Any, key: str) -> tuple[str, str] | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(key, value.get("arguments", value.get("parameters", {})))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return value["name"], json.dumps(arguments, ensure_ascii=False)


def _parse_reply(text: str, syntax: str) -> list[tuple[str, str]] | None:
    """A whole llama3 or mistral reply as its calls, or None if it is not calls."""
    body = text.strip().removeprefix("<|python_tag|>").removeprefix("[TOOL_CALLS]").strip()
    key = "parameters" if syntax == "llama3" else "arguments"
    try:
        value = json.loads(body)
        items = value if isinstance(value, list) else [value]
    except ValueError:
        if syntax != "llama3":
            return None
        try:  # Llama 3.x writes several calls separated by ';'
            items = [json.loads(part) for part in body.split(";") if part.strip()]
        except ValueError:
            return None
    calls = [_as_call(item, key) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]

"""Driving an engine in-process: admit requests, step until done, collect the text."""

from __future__ import annotations

from actors import Chunk, Generate
from actors.engine import Engine, EngineEvent


def run_all(engine: Engine, requests: list[Generate]) -> list[EngineEvent]:
    """Admit every request, step until all finished; every event in order."""
    events: list[EngineEvent] = []
    for request in requests:
        events += engine.admit(request)
    while engine.active:
        events += engine.step()
    return events


def texts(events: list[EngineEvent]) -> dict[str, str]:
    out: dict[str, str] = {}
    for e in events:
        if isinstance(e, Chunk):
            out[e.request_id] = out.get(e.request_id, "") + e.text
    return out

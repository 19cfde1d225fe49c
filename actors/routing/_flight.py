"""The router's records: a local worker's slots, a request in flight, and the counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import zmq

from actors.wire._messages import Generate, WorkerState


@dataclass(frozen=True, slots=True)
class Client:
    """Who asked: the router socket it came in on (public or inside) and its routing identity."""

    sock: zmq.Socket
    identity: bytes


@dataclass(slots=True)
class WorkerSlots:
    """A local shard-worker as the router sees it: its last state and the requests it holds."""

    state: WorkerState
    busy_with: set[str] = field(default_factory=set)

    @property
    def room(self) -> int:
        """How many more requests the worker takes now."""
        return self.state.slots - len(self.busy_with) if self.state.state == "ready" else 0

    def snapshot(self, worker_id: str) -> dict[str, Any]:
        s = self.state
        return {
            "worker_id": worker_id,
            "model": s.model_id,
            "state": s.state,
            "engine_pid": s.engine_pid,
            "restarts": s.restarts,
            "n_ctx": s.n_ctx,
            "busy": bool(self.busy_with),
            "active": len(self.busy_with),
            "slots": s.slots,
            "detail": s.detail,
        }


@dataclass(slots=True)
class Flight:
    """A request the router answers for: who asked, which worker has it (None while queued)."""

    client: Client
    request: Generate
    worker: bytes | None = None
    last_sent: float = 0.0
    cancelled: bool = False
    remote: str | None = None  # the peer it was forwarded to
    remote_heard: float = 0.0  # when that peer last said anything about it
    tried: set[str] = field(default_factory=set)  # nodes it was placed on
    resumes: int = 0  # times a local engine died under it and it was placed again
    started: bool = False  # the client has seen `Started`: a retry must resume, not restart
    prompt_tokens: int = 0  # as the first `Started` said
    sent_ids: list[int] = field(default_factory=list)  # token ids of the text the client has
    sent_tokens: int = 0
    not_before: float = 0.0  # a peer said it was busy: not placed again before this
    base_tokens: int = 0  # tokens sent before the current placement (after a resume)
    grace_until: float = 0.0  # after a node failed it: wait this long for another to appear


@dataclass(slots=True)
class Counters:
    """What the router did, as `mesh-ctl status` reports it."""

    rejected_overload: int = 0  # 429s: counted apart from admitted requests
    completed: int = 0
    failed: int = 0
    cancelled: int = 0  # each request ends in exactly one of these three, or is still in flight
    retried: int = 0  # placed again after a peer failed before the first token
    resumed: int = 0  # continued on another node after a peer failed mid-stream
    drafted: int = 0  # speculative decoding on this node's workers: tokens drafted
    accepted: int = 0  # ... and accepted by the target model

    def snapshot(self, *, in_flight: int) -> dict[str, Any]:
        """`admitted = completed + failed + cancelled + in_flight`, by construction."""
        rate = round(self.accepted / self.drafted, 4) if self.drafted else None
        return {
            "requests": {
                "admitted": self.completed + self.failed + self.cancelled + in_flight,
                "in_flight": in_flight,
                "completed": self.completed,
                "failed": self.failed,
                "cancelled": self.cancelled,
                "rejected_overload": self.rejected_overload,
                "retried": self.retried,
                "resumed": self.resumed,
            },
            "speculative": {
                "drafted_tokens": self.drafted,
                "accepted_tokens": self.accepted,
                "acceptance_rate": rate,
            },
        }

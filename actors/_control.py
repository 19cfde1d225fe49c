"""The control actor: answers `mesh-ctl` over ZeroMQ (ROUTER on the node's first port).

It asks the router for a snapshot and adds what the node knows about itself, without blocking:
each `mesh-ctl` query becomes a router query, and the router's answer completes the reply.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import zmq

from actors._codec import encode
from actors._messages import Answer, Query
from actors._runtime import Actor

COMMANDS = ("status", "peers", "models")


class Control(Actor):
    """Serves `Query(what in COMMANDS)` from mesh-ctl with JSON-ready answers."""

    def __init__(
        self,
        ctx: zmq.Context,
        *,
        endpoint: str,
        router_endpoint: str,
        node_info: dict[str, Any],
        **kwargs: object,
    ) -> None:
        super().__init__(ctx, "control", **kwargs)  # type: ignore[arg-type]
        self.endpoint = endpoint
        self.router_endpoint = router_endpoint
        self.node_info = node_info
        self._started = time.time()
        self._ids = itertools.count()
        self._waiting: dict[str, tuple[bytes, Query]] = {}
        self._front: zmq.Socket | None = None
        self._router: zmq.Socket | None = None

    def setup(self) -> None:
        self._front = self.socket(zmq.ROUTER)
        self._front.bind(self.endpoint)
        self._router = self.socket(zmq.DEALER)
        self._router.connect(self.router_endpoint)
        self.on_socket(self._front, self._from_ctl)
        self.on_socket(self._router, self._from_router)

    def _from_ctl(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.stats["dropped_frames"] += 1
            return
        client, frame = frames
        query = self.decode(frame, "mesh-ctl")
        if not isinstance(query, Query):
            return
        if query.what not in COMMANDS:
            self._reply(
                client, Answer(request_id=query.request_id, data={"error": f"unknown command {query.what!r}"})
            )
            return
        inner = f"ctl-{next(self._ids)}"
        self._waiting[inner] = (client, query)
        assert self._router is not None
        self._router.send(encode(Query(request_id=inner, what="status")))

    def _from_router(self, frames: list[bytes]) -> None:
        answer = self.decode(frames[-1], "router")
        if not isinstance(answer, Answer) or answer.request_id not in self._waiting:
            return
        client, query = self._waiting.pop(answer.request_id)
        self._reply(client, Answer(request_id=query.request_id, data=self.compose(query.what, answer.data)))

    def compose(self, what: str, router: dict[str, Any]) -> dict[str, Any]:
        """The reply to a mesh-ctl command, from the router's status snapshot."""
        info = self.node_info
        if what == "peers":
            return {"peers": []}
        if what == "models":
            return {
                "models": [
                    {
                        "id": m,
                        "nodes": [info["node_id"]],
                        "ready_nodes": [info["node_id"]] if m in router["ready"] else [],
                    }
                    for m in router["models"]
                ]
            }
        return {
            "node_id": info["node_id"],
            "mesh": info["mesh"],
            "role": info["role"],
            "models": router["models"],
            "peers": [],
            "host": info["host"],
            "http_port": info["http_port"],
            "zmq_port": info["zmq_port"],
            "version": info["version"],
            "uptime_s": round(time.time() - self._started, 1),
            "ready": bool(router["ready"]),
            "workers": router["workers"],
            "queues": router["queues"],
            "in_flight": router["in_flight"],
            "requests": router["requests"],
            "dropped_frames": router["dropped_frames"] + self.stats["dropped_frames"],
        }

    def _reply(self, client: bytes, answer: Answer) -> None:
        assert self._front is not None
        try:
            self._front.send_multipart([client, encode(answer)], zmq.NOBLOCK)
        except zmq.ZMQError as err:
            self.warn_once("ctl-send", "control: mesh-ctl client went away: %s", err)

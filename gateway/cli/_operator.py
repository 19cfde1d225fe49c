"""The node's operator: changes which models a running node serves, one change at a time, on a
thread of its own — promotions and step-backs the gossip actor decides (DESIGN §2.10), and
mesh-ctl's `drain`, `promote` and `swap`.

No change fails a request: a model leaves only once the requests it holds have finished. It
stops being advertised first (peers stop sending it work within a heartbeat) and this node's
router stops placing new requests on it; what is queued waits for the model's other worker (a
swap) or is placed elsewhere (a drain).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from actors import PeerUnavailable
from actors.gguf._identity import check_model
from actors.node import ModelSpec, Node
from actors.runtime._ask import ask
from discovery._gossip import Gossip

log = logging.getLogger("mesh_llm.operator")
POLL_S = 0.1


class Operator:
    def __init__(
        self,
        node: Node,
        gossip: Gossip,
        standby: list[ModelSpec],
        on_leave: Callable[[], None] = lambda: None,
    ) -> None:
        """`standby`: models this node holds without serving them; `on_leave`: ends the node
        (after `drain --leave`)."""
        self.node = node
        self.gossip = gossip
        self.standby = {m.model_id: m for m in standby}
        self.on_leave = on_leave
        self._queue: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue(maxsize=64)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="operator", daemon=True)
        self.doing = ""  # the change under way
        self.last: dict[str, Any] = {}  # how the last one ended

    def start(self) -> Operator:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            self._queue.put_nowait(("", {}))  # wakes the thread (it sleeps until there is work)
        except queue.Full:
            pass
        self._thread.join(timeout=5)

    # -- what other threads call ---------------------------------------------------------------

    def elastic(self, action: str, model: str) -> None:
        """The gossip actor's decision ("promote" or "step_back"), on its thread."""
        self._put(action, {"model": model, "automatic": True})

    def command(self, what: str, args: dict[str, Any]) -> dict[str, Any]:
        """mesh-ctl's command (on the control actor's thread): checked, queued, answered at once."""
        if what == "state":
            return {"doing": self.doing, "queued": self._queue.qsize(), "last": self.last}
        if what == "promote":
            model = args.get("model")
            if model not in self.standby:
                held = ", ".join(sorted(self.standby)) or "none"
                return {"error": f"this node holds no standby model {model!r} (it holds: {held})"}
        elif what == "swap":
            try:
                check_model(Path(str(args.get("path", ""))))
            except ValueError as err:
                return {"error": f"cannot swap to {args.get('path')!r}: {err}"}
        elif what != "drain":
            return {"error": f"unknown operation {what!r}"}
        if not self._put(what, args):
            return {"error": "too many operations waiting; try again later"}
        return {"accepted": what, "args": args, "queued_behind": self.doing or None}

    def _put(self, what: str, args: dict[str, Any]) -> bool:
        try:
            self._queue.put_nowait((what, args))
            return True
        except queue.Full:
            log.warning("operator: dropped %s %s (queue full)", what, args)
            return False

    # -- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            what, args = self._queue.get()
            if self._stop.is_set():
                return
            self.doing = what
            started = time.monotonic()
            try:
                detail = getattr(self, f"_{what}")(**args)
                self.last = {"what": what, "ok": True, "detail": detail}
            except Exception as err:  # one failed change must not end the operator
                log.exception("operator: %s %s failed", what, args)
                self.last = {"what": what, "ok": False, "detail": f"{type(err).__name__}: {err}"}
            self.last["seconds"] = round(time.monotonic() - started, 2)
            log.info("operator: %s", self.last)
            self.doing = ""

    def _status(self) -> dict[str, Any]:
        """The router's snapshot (workers, queues, requests in flight), asked in process."""
        return ask(self.node.ctx, self.node.router_local_endpoint, "status", timeout_s=5)

    def _until(self, done: Callable[[dict[str, Any]], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                if done(self._status()):
                    return True
            except PeerUnavailable:
                pass
            time.sleep(POLL_S)
        return False

    def _workers_of(self, model: str) -> list[str]:
        return [w.worker_id for w in self.node.workers if w.spec.model_id == model]

    def _load(self, spec: ModelSpec) -> str:
        """Start a worker for `spec` and wait until it serves; its id. Raises if it cannot."""
        worker = self.node.add_worker(spec)

        def state(status: dict[str, Any]) -> str:
            return next((w["state"] for w in status["workers"] if w["worker_id"] == worker.worker_id), "")

        timeout = self.node.spec.config.engine_load_timeout_s
        if (
            not self._until(lambda s: state(s) in ("ready", "failed"), timeout)
            or state(self._status()) != "ready"
        ):
            self.node.retire_worker(worker.worker_id)
            raise RuntimeError(f"{spec.source} did not load")
        return worker.worker_id

    def _let_go(self, worker_ids: list[str]) -> None:
        """Take workers out: no new work for them, then retire each once it holds no request."""
        router = self.node.router
        identities = {w.encode() for w in worker_ids}
        router.retiring = router.retiring | identities
        try:
            idle = lambda s: not any(w["busy"] for w in s["workers"] if w["worker_id"] in worker_ids)  # noqa: E731
            self._until(idle, timeout_s=24 * 3600)
            for worker_id in worker_ids:
                self.node.retire_worker(worker_id)
        finally:
            router.retiring = router.retiring - identities

    # -- the changes ---------------------------------------------------------------------------

    def _promote(self, model: str, automatic: bool = False) -> str:
        if self._workers_of(model):
            return f"{model} is served here already"
        self.node.router.draining = False
        self.gossip.role_override = "serving"
        try:
            worker_id = self._load(self.standby[model])
        except Exception:
            self.gossip.elastic.claims.pop(model, None)
            self.gossip.elastic.standby_for.discard(model)  # no retrying a model that cannot load
            self.gossip.role_override = "standby" if not self.node.workers else "serving"
            raise
        if not automatic:  # an operator's promotion stays until an operator drains it
            self.gossip.elastic.standby_for.discard(model)
        return f"{model} serves here ({worker_id})"

    def _step_back(self, model: str, automatic: bool = True) -> str:
        self._let_go(self._workers_of(model))
        if not self.node.workers:
            self.gossip.role_override = "standby"
        return f"{model} no longer served here"

    def _drain(self, leave: bool = False) -> str:
        router = self.node.router
        router.draining = True
        self.gossip.role_override = "draining"
        self._until(lambda s: s["in_flight"] == 0 and not any(s["queues"].values()), timeout_s=24 * 3600)
        if leave:  # the gateway goes too: wait also for what it relays from other nodes
            self._until(lambda s: s["requests"]["in_flight"] == 0, timeout_s=24 * 3600)
        for worker in list(self.node.workers):
            self.standby.setdefault(worker.spec.model_id, _spec_of(worker.spec))
            self.node.retire_worker(worker.worker_id)
        self.gossip.elastic.standby_for.clear()  # drained for maintenance: promoted only by hand
        router.draining = False
        self.gossip.role_override = "standby" if self.standby else "client"
        if leave:
            self.on_leave()
        return "drained" + (" and leaving" if leave else "")

    def _swap(self, path: str) -> str:
        old = list(self.node.workers)  # the whole models served here (a split head is not swapped)
        base = _spec_of(old[0].spec) if old else None
        spec = ModelSpec(
            source=path,
            model_id=check_model(Path(path)),
            draft=base.draft if base else None,
            speculative=base.speculative if base else "",
        )
        new_id = self._load(spec)
        self.gossip.role_override = "serving"
        self._let_go([w.worker_id for w in old])
        return f"{spec.model_id} from {path} serves ({new_id}); {len(old)} worker(s) retired"


def _spec_of(engine: Any) -> ModelSpec:
    """The ModelSpec an EngineSpec was made from (what a worker needs to be loaded again)."""
    return ModelSpec(
        source=engine.model, model_id=engine.model_id, draft=engine.draft, speculative=engine.speculative
    )

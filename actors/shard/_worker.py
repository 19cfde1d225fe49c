"""The shard-worker actor: owns one llama.cpp engine in a supervised child process.

It takes up to `slots` requests at once from the router (over DEALER, identity = worker id),
relays them to the child over a PAIR socket and relays the child's events back. When the child
dies, every request in flight fails with `engine_failed` and the child is restarted after a
back-off.

A *managed* worker (a dense split's head) takes its orders on a control socket instead: an
`EngineSpec` to load (replacing the engine it runs), or a `WorkerState` to hold without an engine
("loading" while a split forms, "failed" with the reason when it cannot); it reports every state
change there too, and never restarts a dead engine by itself.
"""

from __future__ import annotations

import base64
import itertools
import logging
import os
import sys
from collections import Counter

import zmq

from actors._errors import EngineFailed, NotReady
from actors.runtime._actor import Actor
from actors.runtime._supervisor import Backoff, ChildProcess
from actors.wire._codec import Message, encode
from actors.wire._messages import (
    TERMINAL_TYPES,
    Cancel,
    EngineReady,
    EngineSpec,
    ErrorReply,
    Generate,
    WorkerState,
    WorkerStateName,
)
from actors.wire._sockets import private_ipc, remove_ipc

log = logging.getLogger(__name__)
_pipes = itertools.count()  # engine pipes made by this process (each child gets a fresh one)


class ShardWorker(Actor):
    """Serves one `EngineSpec` (a GGUF path or a `fake:` model) with one engine child."""

    def __init__(
        self,
        ctx: zmq.Context,
        worker_id: str,
        *,
        spec: EngineSpec,
        router_endpoint: str,
        control_endpoint: str | None = None,
        **kwargs: object,
    ) -> None:
        """`control_endpoint`: makes this a managed worker (see the module's doc)."""
        super().__init__(ctx, worker_id, **kwargs)  # type: ignore[arg-type]
        self.worker_id = worker_id
        self.spec = spec
        self.control_endpoint = control_endpoint
        self._control: zmq.Socket | None = None
        self.last_event_at = 0.0  # when the engine last said or was given anything (a split's watchdog)
        self.router_endpoint = router_endpoint
        self.n_ctx = spec.n_ctx  # then as the loaded engine says
        self.slots = spec.slots
        self.state: WorkerStateName = "loading"
        self._reported: Counter[str] = Counter()  # the stats the router last heard
        self.restarts = 0
        self._failed_loads = 0
        self._detail = ""
        self._current: dict[str, Generate] = {}
        self._cancel_deadlines: dict[str, float] = {}
        self._restart_at: float | None = None
        self._load_deadline = 0.0
        self._child: ChildProcess | None = None
        self._engine: zmq.Socket | None = None
        self._engine_pipe: str | None = None  # the engine pipe's ipc endpoint, until the child connected
        self._router: zmq.Socket | None = None
        self._backoff = Backoff(
            self.config.engine_restart_backoff_s, self.config.engine_max_restart_backoff_s
        )

    def setup(self) -> None:
        self._router = self.socket(zmq.DEALER, identity=self.worker_id.encode())
        if self._host is not None:
            # On the router's own thread (its guest) a send that waited for room would wait for
            # ever: the router reads only when this handler returns. What one handler sends is
            # bounded (one engine message's events), and the router reads it all next.
            self._router.setsockopt(zmq.SNDHWM, 0)
        self._router.connect(self.router_endpoint)
        self.on_socket(self._router, self._from_router)
        if self.control_endpoint is not None:
            self._control = self.socket(zmq.PAIR)
            self._control.connect(self.control_endpoint)
            self.on_socket(self._control, self._from_control)
            self._set_state("loading", "waiting for the split to form")
        else:
            self._spawn()

    def teardown(self) -> None:
        if self._router is not None:  # what we say last must reach the router
            self._router.setsockopt(zmq.LINGER, int(self.config.actor_stop_timeout_s * 1000))
        self._fail_current("the worker is shutting down (the node stops, or the worker was retired)")
        if self._child is not None:
            self._child.close()
            self._child = None
        self._drop_pipe()
        self._set_state("retired", "stopped")  # the router forgets this worker

    idle_tick_s = 1.0  # no engine to restart, load or cancel

    def idle(self) -> bool:
        return (
            self._restart_at is None
            and self.state != "loading"
            and not self._cancel_deadlines
            and self.stats == self._reported
        )

    def on_tick(self, now: float) -> None:
        if self._restart_at is not None and now >= self._restart_at:
            self._restart_at = None
            self._spawn()
        elif self._child is not None and self.state == "loading" and now > self._load_deadline:
            log.warning(
                "%s: engine did not load in %.0fs; killing it",
                self.worker_id,
                self.config.engine_load_timeout_s,
            )
            self._child.kill()
        elif self._child is not None and any(now > t for t in self._cancel_deadlines.values()):
            log.warning("%s: engine ignored a cancel; killing it", self.worker_id)
            self._child.kill()
        if self.stats != self._reported:  # dropped frames or handler errors since: say so
            self._set_state(self.state, self._detail)

    # -- the engine child ---------------------------------------------------------------------

    def _spawn(self) -> None:
        engine = self.socket(zmq.PAIR)
        # ipc, not loopback TCP: one token's trip to the node costs less, and only this user's
        # processes can reach the pipe.
        endpoint = private_ipc(f"engine-{self.worker_id}-{next(_pipes)}")
        engine.bind(endpoint)
        self._engine_pipe = endpoint
        argv = [
            sys.executable, "-m", "actors.engine._child",
            "--endpoint", endpoint,
            "--parent-pid", str(os.getpid()),
            "--spec", base64.b64encode(encode(self.spec)).decode(),
        ]  # fmt: skip
        self._child = ChildProcess(argv)
        pid = self._child.start()
        self._engine = engine
        self.on_socket(engine, self._from_engine)
        self.on_fd(self._child.exit_fd, self._on_child_exit)
        self._load_deadline = self.clock() + self.config.engine_load_timeout_s
        self._set_state("loading", f"engine pid {pid} loading {self.spec.model}")

    def _drop_pipe(self) -> None:
        remove_ipc(self._engine_pipe)
        self._engine_pipe = None

    def _release_engine(self) -> int | None:
        """Let go of the running engine child (killed if it still runs), its pipe and its
        watches; its exit code (None: it was still running)."""
        child, engine = self._child, self._engine
        assert child is not None and engine is not None  # the callers checked
        code = child.exit_code()
        self.forget(child.exit_fd)
        self.forget(engine)
        self._drop_pipe()
        child.close()
        self._child = self._engine = None
        self._cancel_deadlines.clear()
        return code

    def _on_child_exit(self) -> None:
        if self._child is None or self._engine is None:
            return
        code = self._release_engine()
        self.restarts += 1
        if self._control is not None:  # managed: whoever manages us decides what comes next
            self._set_state("loading", f"engine exited with code {code}")
            self._fail_current(f"the engine process died (exit code {code})")
            return
        if self.state == "loading":
            self._failed_loads += 1
        # The router must see the new state before the failure frees this worker for more work.
        if self._failed_loads >= self.config.engine_max_failed_loads:
            self._set_state("failed", self._detail or f"engine exited with code {code} while loading")
        else:
            delay = self._backoff.next_delay()
            log.warning("%s: engine exited with code %s; restarting in %.1fs", self.worker_id, code, delay)
            self._restart_at = self.clock() + delay
            self._set_state("loading", f"engine exited with code {code}; restarting")
        self._fail_current(f"the engine process died (exit code {code}); it is being restarted")

    def _from_control(self, frames: list[bytes]) -> None:
        message = self.decode(frames[-1], "control")
        if isinstance(message, EngineSpec | WorkerState):
            self._stop_engine()
            if isinstance(message, EngineSpec):
                self.spec = message
                self._spawn()
            elif message.state in ("loading", "failed"):
                self._set_state(message.state, message.detail)

    def _stop_engine(self) -> None:
        """Kill the engine (its requests fail: the router resumes them when we are ready again)."""
        if self._child is None or self._engine is None:
            return
        self._release_engine()
        self._set_state("loading", "replacing the engine")  # before the failures: the router resumes them
        self._fail_current("the engine was replaced (its split is re-forming)")

    def _from_engine(self, frames: list[bytes]) -> None:
        """Each frame is one event (the child's outbox sends several requests' chunks as the
        frames of one message); a bad one is dropped without the others."""
        self.last_event_at = self.clock()
        for frame in frames:
            self._engine_event(self.decode(frame, "engine"))

    def _engine_event(self, message: Message | None) -> None:
        if isinstance(message, EngineReady):
            self._drop_pipe()  # the child is connected: nobody else may connect from now on
            self._failed_loads = 0
            self._backoff.reset()
            self.n_ctx = message.n_ctx
            self.slots = message.slots
            self._set_state("ready", f"engine pid {message.pid}, {message.n_params} parameters")
        elif isinstance(message, ErrorReply) and not message.request_id:
            self._detail = message.message  # a failed load; the exit follows
            log.error("%s: %s", self.worker_id, message.message)
        elif message is not None and getattr(message, "request_id", None) in self._current:
            rid = message.request_id
            self._send_router(message)
            if isinstance(message, TERMINAL_TYPES):
                del self._current[rid]
                self._cancel_deadlines.pop(rid, None)

    # -- the router ---------------------------------------------------------------------------

    def _from_router(self, frames: list[bytes]) -> None:
        message = self.decode(frames[-1], "router")
        if isinstance(message, Generate):
            if len(self._current) >= self.slots or self.state != "ready" or self._engine is None:
                why = f"worker {self.state}, {len(self._current)} of {self.slots} slots busy"
                self._send_router(ErrorReply(request_id=message.request_id, code=NotReady.code, message=why))
                return
            self._current[message.request_id] = message
            self._engine.send(encode(message))
            self.last_event_at = self.clock()
        elif isinstance(message, Cancel) and self._holds(message.request_id):
            assert self._engine is not None  # _holds() checked it
            self._engine.send(encode(message))
            self._cancel_deadlines[message.request_id] = self.clock() + self.config.cancel_grace_s

    @property
    def busy(self) -> bool:
        """Whether the engine works on any request (read from other threads: a split's watchdog)."""
        return bool(self._current)

    def _holds(self, request_id: str) -> bool:
        """Whether the engine works on `request_id` now."""
        return request_id in self._current and self._engine is not None

    def _send_router(self, message: Message) -> None:
        assert self._router is not None  # set in setup, on this thread
        self._router.send(encode(message))

    def _fail_current(self, why: str) -> None:
        """Fail every request the engine held."""
        for rid in self._current:
            self._send_router(ErrorReply(request_id=rid, code=EngineFailed.code, message=why))
        self._current.clear()

    def _set_state(self, state: WorkerStateName, detail: str) -> None:
        self.state = state
        self._detail = detail
        self._reported = Counter(self.stats)
        news = WorkerState(
            worker_id=self.worker_id,
            model_id=self.spec.model_id,
            state=state,
            engine_pid=self._child.pid if self._child is not None else None,
            restarts=self.restarts,
            n_ctx=self.n_ctx,
            detail=detail,
            slots=self.slots,
            stats=dict(self.stats),
        )
        self._send_router(news)
        if self._control is not None:
            self._control.send(encode(news))

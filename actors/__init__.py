"""The node's actor system.

Map of this room:
- `_runtime`     Actor base: a thread, its sockets, start handshake, poll loop, stop.
- `_messages`    one frozen dataclass per wire message kind; `_codec` packs and checks them.
- `_sockets`     the one socket factory; `_errors` the error tree; `_config` timings and sizes.
- `_router`      admission (bounded queue per model), forwarding, streaming back, cancel.
- `_worker`      shard-worker: one engine child process, supervised (`_supervisor`).
- `_engine`      the engine (llama.cpp, or a fake for tests); `_engine_child` its process main.
- `_drafter`     the speculative-drafter actor (draft model, in the engine child); `_speculative`
                 prompt lookup, draft length and the governor that decides whether drafting pays.
- `_control`     answers mesh-ctl; `_client.ask` is the caller's side.
- `_node`        assembles the actors of one node.
- `_synth`       synthesized GGUF models (GGUF tooling sits with the worker that loads it);
                 `_moe` expert importance and split plans, `_shards` expert-sharded GGUFs,
                 their fidelity gate and `mesh-ctl moe split`.
- `_peers`       the router's table of peers (near/far, load, room); `_placement` rendezvous;
                 `_flight` the router's records (worker slots, requests in flight, counters).
"""

from actors._client import ask
from actors._codec import Message, decode, encode
from actors._config import (
    CONTROL_PORT_OFFSET,
    GOSSIP_PORT_OFFSET,
    PROTOCOL_VERSION,
    ROUTER_PORT_OFFSET,
    NodeConfig,
)
from actors._engine import check_context, model_id_of
from actors._errors import (
    ActorStartError,
    ActorStopped,
    ContextOverflow,
    EngineFailed,
    InvalidRequest,
    MeshError,
    ModelNotFound,
    NotReady,
    Overloaded,
    PeerUnavailable,
    ProtocolError,
    RequestError,
    request_error,
)
from actors._messages import (
    TERMINAL_TYPES,
    Accepted,
    Answer,
    Cancel,
    Chunk,
    ErrorReply,
    Finished,
    Generate,
    Pending,
    Query,
    Started,
)
from actors._node import VERSION, ModelSpec, Node, NodeSpec
from actors._runtime import Actor
from actors._sockets import make_socket
from actors._synth import ARCHS, PRESETS, Shape, shape_for, synthesize

__all__ = [
    "ARCHS",
    "CONTROL_PORT_OFFSET",
    "GOSSIP_PORT_OFFSET",
    "PRESETS",
    "PROTOCOL_VERSION",
    "ROUTER_PORT_OFFSET",
    "TERMINAL_TYPES",
    "VERSION",
    "Accepted",
    "Actor",
    "ActorStartError",
    "ActorStopped",
    "Answer",
    "Cancel",
    "Chunk",
    "ContextOverflow",
    "EngineFailed",
    "ErrorReply",
    "Finished",
    "Generate",
    "InvalidRequest",
    "MeshError",
    "Message",
    "ModelNotFound",
    "ModelSpec",
    "Node",
    "NodeConfig",
    "NodeSpec",
    "NotReady",
    "Overloaded",
    "PeerUnavailable",
    "Pending",
    "ProtocolError",
    "Query",
    "RequestError",
    "Shape",
    "Started",
    "ask",
    "check_context",
    "decode",
    "encode",
    "make_socket",
    "model_id_of",
    "request_error",
    "shape_for",
    "synthesize",
]

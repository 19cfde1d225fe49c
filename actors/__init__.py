"""The node: its actor runtime, the wire, its actors, and the GGUF files they load.

Map of this room (each folder's `__init__` says more):
- `_config`   every tunable of a node, unit in the name; `_errors` the error tree; `_lazy` names
              a package loads on first use.
- `runtime/`  generic actors, child-process supervision, `ask()`.
- `wire/`     message kinds, the one codec, the one socket factory.
- `routing/`  the router actor: admission, placement, forwarding, failover.
- `shard/`    the shard-worker actor (runs on a poll loop, never blocks).
- `engine/`   what runs only inside engine child processes (llama.cpp, drafter; may block).
- `node/`     composition (`Node`) and the control actor behind `mesh-ctl`.
- `gguf/`     model identity, synthesis, layer layouts and RPC cache files; `moe/` expert
              analysis and splits.
- `splits/`   dense layer splits: the planner, the head and stage actors, the RPC tunnel.

This package's surface imports neither numpy nor llama.cpp: `actors.gguf`, `actors.moe` and the
engine's llama.cpp module are imported where they are used. The node and the actor runtime load
when first asked for (`actors.Node`), so that an engine child, which needs neither, starts without
them (measured: ~0.1 s of its ~0.45 s start-up on 2 cores).
"""

from typing import TYPE_CHECKING

from actors._config import (
    CONTROL_PORT_OFFSET,
    GOSSIP_PORT_OFFSET,
    PROTOCOL_VERSION,
    ROUTER_PORT_OFFSET,
    TUNNEL_PORT_OFFSET,
    ZMQ_PORT_SPAN,
    NodeConfig,
)
from actors._errors import (
    ActorStartError,
    ActorStopped,
    ContextOverflow,
    EngineFailed,
    InternalError,
    InvalidRequest,
    MeshError,
    ModelNotFound,
    NotReady,
    Overloaded,
    PeerUnavailable,
    ProtocolError,
    RequestError,
    RequestTooLarge,
    Unauthorized,
    request_error,
)
from actors._lazy import lazy_names
from actors.wire import (
    TERMINAL_TYPES,
    Accepted,
    Answer,
    Cancel,
    Chunk,
    ErrorReply,
    Finished,
    Generate,
    Message,
    Pending,
    Query,
    Started,
    TokenLogprob,
    TopLogprob,
    decode,
    encode,
    make_socket,
)

if TYPE_CHECKING:
    from actors.node import VERSION, ModelSpec, Node, NodeSpec
    from actors.runtime import Actor, ask

__getattr__ = lazy_names(
    __name__,
    {
        **dict.fromkeys(("VERSION", "ModelSpec", "Node", "NodeSpec"), "actors.node"),
        **dict.fromkeys(("Actor", "ask"), "actors.runtime"),
    },
)


__all__ = [
    "CONTROL_PORT_OFFSET",
    "GOSSIP_PORT_OFFSET",
    "PROTOCOL_VERSION",
    "ROUTER_PORT_OFFSET",
    "TERMINAL_TYPES",
    "TUNNEL_PORT_OFFSET",
    "VERSION",
    "ZMQ_PORT_SPAN",
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
    "InternalError",
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
    "RequestTooLarge",
    "Started",
    "TokenLogprob",
    "TopLogprob",
    "Unauthorized",
    "ask",
    "decode",
    "encode",
    "make_socket",
    "request_error",
]

"""The node: its actor runtime, the wire, its actors, and the GGUF files they load.

Map of this room (each folder's `__init__` says more):
- `_config`   every tunable of a node, unit in the name; `_errors` the error tree.
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
engine's llama.cpp module are imported where they are used.
"""

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
from actors.node import VERSION, ModelSpec, Node, NodeSpec
from actors.runtime import Actor, ask
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

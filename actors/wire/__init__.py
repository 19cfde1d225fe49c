"""Everything that crosses a socket.

- `_messages`  one frozen dataclass per message kind (and the nested records they carry).
- `_codec`     the one codec: versioned msgpack frames, validated on decode (`ProtocolError`).
- `_sockets`   the one socket factory: every socket of the node is made there.
- `_curve`     CURVE and ZAP: node keys, the keyring of a secured mesh's members, and `listen` /
               `dial`, through which every network socket binds or connects (secured when the
               context is).
"""

from actors.wire._codec import Message, decode, encode, peek_version
from actors.wire._messages import (
    MESSAGE_TYPES,
    TERMINAL_TYPES,
    Accepted,
    Answer,
    Cancel,
    Chunk,
    Demand,
    Drafted,
    DraftRequest,
    EngineReady,
    ErrorReply,
    Finished,
    Generate,
    Heartbeat,
    MeshView,
    PeerSeen,
    Pending,
    Query,
    Started,
    TokenLogprob,
    TopLogprob,
    WorkerState,
)
from actors.wire._sockets import make_socket

__all__ = [
    "MESSAGE_TYPES",
    "TERMINAL_TYPES",
    "Accepted",
    "Answer",
    "Cancel",
    "Chunk",
    "Demand",
    "DraftRequest",
    "Drafted",
    "EngineReady",
    "ErrorReply",
    "Finished",
    "Generate",
    "Heartbeat",
    "MeshView",
    "Message",
    "PeerSeen",
    "Pending",
    "Query",
    "Started",
    "TokenLogprob",
    "TopLogprob",
    "WorkerState",
    "decode",
    "encode",
    "make_socket",
    "peek_version",
]

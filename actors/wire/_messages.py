"""Every message kind on the wire: one frozen dataclass per kind, tagged with `KIND`.

Kinds are append-only; a breaking change bumps `PROTOCOL_VERSION` in `_config`.
Request ids are chosen by whoever starts a request and travel with every answer to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

# Closed sets, spelled once.
MemberState = Literal["alive", "suspect", "dead", "left"]
WorkerStateName = Literal["loading", "ready", "failed", "retired"]
SplitStateName = Literal["planning", "loading", "serving", "failed"]
# How a split's stage gets its weights: read from its own GGUF (the project's llama.cpp patch), from
# RPC cache files it built from its own GGUF (stock llama.cpp), or sent by the head.
LoadMode = Literal["file", "hash-cache", "transfer"]
LOAD_MODES: tuple[LoadMode, ...] = ("file", "hash-cache", "transfer")  # best first
SplitLoad = Literal["auto", "file", "hash-cache", "transfer"]  # --split-load: auto is the best both ends can
StageStateName = Literal["loading", "ready", "refused", "released"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Generate:
    """Ask for a completion of `prompt`, or of `messages` rendered by the model's chat template."""

    KIND: ClassVar[str] = "generate"
    request_id: str
    model: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0  # 1: off
    logit_bias: dict[str, float] = field(default_factory=dict)  # token id (a string, as in JSON) -> bias
    # Structured output: {} (free text), {"type": "json_object"}, {"type": "json_schema", "schema": {...}}
    response_format: dict[str, Any] = field(default_factory=dict)
    # Tools the model may call: OpenAI function tools, {"type": "function", "function": {...}}.
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str = "auto"  # "auto", "none", "required", or "function:NAME" (that call, forced)
    logprobs: int = -1  # -1: none; k >= 0: each token's log probability and the k likeliest
    embed: bool = False  # not a completion: the prompt's embedding, in `Finished.embedding`
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    session: str = ""  # requests of one session go to the same node (rendezvous hashing)
    speculative: str = ""  # "" the node's default, "off", "lookup" (prompt lookup) or "draft"
    resume_tokens: list[int] = field(default_factory=list)  # ids already streamed: continue after them
    forwarded: bool = False  # already placed by another node's router: serve it here
    api_key: str = ""  # from a peer's router on an open mesh whose nodes require API keys


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel:
    """Stop working on a request; nothing more is sent for it."""

    KIND: ClassVar[str] = "cancel"
    request_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Accepted:
    """The router admitted the request (it is queued or running)."""

    KIND: ClassVar[str] = "accepted"
    request_id: str
    node_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Pending:
    """Keep-alive for a request that is admitted but has nothing new to say yet."""

    KIND: ClassVar[str] = "pending"
    request_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Started:
    """The engine evaluated the prompt and begins to generate."""

    KIND: ClassVar[str] = "started"
    request_id: str
    prompt_tokens: int
    node_id: str = ""  # the node generating it, stamped by that node's router
    tool_syntax: str = ""  # with tools: how this model writes a call (actors.engine._tools.SYNTAXES)


@dataclass(frozen=True, slots=True, kw_only=True)
class TopLogprob:
    """One of the likeliest tokens at a place: its bytes and log probability."""

    piece: bytes
    logprob: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenLogprob:
    """A generated token's bytes and log probability (under the model, before sampling), and the
    likeliest tokens at its place (as many as the request asked)."""

    piece: bytes
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class Chunk:
    """Newly generated text, `n_tokens` tokens' worth."""

    KIND: ClassVar[str] = "chunk"
    request_id: str
    text: str
    n_tokens: int
    tokens: list[int] = field(default_factory=list)  # their ids: a failover resumes after them
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, if asked for


@dataclass(frozen=True, slots=True, kw_only=True)
class Finished:
    """The request completed; the last message for it."""

    KIND: ClassVar[str] = "finished"
    request_id: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    drafter: str = ""  # the speculative drafter used ("draft", "lookup"), "" for none
    drafted_tokens: int = 0  # tokens proposed by the drafter
    accepted_tokens: int = 0  # of which the target model accepted
    embedding: list[float] = field(default_factory=list)  # an `embed` request's answer


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorReply:
    """The request failed; the last message for it. `code` names a `RequestError` subclass."""

    KIND: ClassVar[str] = "error"
    request_id: str
    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Query:
    """Ask an actor for a snapshot (`what`: "models", "status")."""

    KIND: ClassVar[str] = "query"
    request_id: str
    what: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """The reply to a `Query`."""

    KIND: ClassVar[str] = "answer"
    request_id: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineSpec:
    """Everything an engine child needs to load and serve its model: the one value a shard-worker
    hands its child (on its command line, as one encoded frame)."""

    KIND: ClassVar[str] = "engine_spec"
    model: str  # a GGUF path, or `fake:...` in tests
    model_id: str
    n_ctx: int = 4096
    n_threads: int = 1
    slots: int = 1  # requests it serves at once (continuous batching)
    draft: str | None = None  # a draft GGUF for speculative decoding
    speculative: str = ""  # the drafter requests get by default: "draft", "lookup" or "" (none)
    # A dense split's head: llama.cpp devices in layer order ("cpu" is this process, else an RPC
    # endpoint on loopback) and the layers each holds (the output layer counted on the last).
    devices: list[str] = field(default_factory=list)
    tensor_split: list[int] = field(default_factory=list)
    # For each device, the identity of the GGUF it loads its tensors from itself ("": send them).
    device_files: list[str] = field(default_factory=list)
    # A request's tokens after its first are sent at most this often, several to a frame: each
    # frame costs CPU on its way to the client, which a small machine takes from decoding.
    stream_interval_ms: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineReady:
    """An engine child loaded its model and takes requests."""

    KIND: ClassVar[str] = "engine_ready"
    model_id: str
    n_ctx: int
    n_params: int
    pid: int
    slots: int = 1  # requests it serves at once


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerState:
    """A shard-worker's state, sent to the router whenever it changes."""

    KIND: ClassVar[str] = "worker_state"
    worker_id: str
    model_id: str
    state: WorkerStateName
    engine_pid: int | None = None
    restarts: int = 0
    n_ctx: int = 0
    detail: str = ""
    slots: int = 1
    stats: dict[str, int] = field(default_factory=dict)  # the worker's dropped frames, handler errors


@dataclass(frozen=True, slots=True, kw_only=True)
class Load:
    """A node's load as its heartbeat says it."""

    in_flight: int = 0  # requests its engines work on
    queued: int = 0  # requests waiting in its queues
    slots: int = 0  # requests its engines can work on at once


@dataclass(frozen=True, slots=True, kw_only=True)
class Demand:
    """Unmet demand for a model at one node, as its router measures it: requests waiting there on
    average (queued, or held while the mesh is busy; time constant `demand_tau_s`), and requests
    refused with a 429 per second over the last `demand_window_s`. Each node reports only what
    waits or is refused at it, so the mesh's demand is the sum over nodes, nothing counted twice."""

    waiting: float = 0.0
    rejected_per_s: float = 0.0

    @property
    def units(self) -> float:
        return self.waiting + self.rejected_per_s


@dataclass(frozen=True, slots=True, kw_only=True)
class ViewRow:
    """One member in a node's gossiped view: membership news, and where to reach the member."""

    node_id: str
    state: MemberState
    incarnation: int
    host: str = ""
    zmq_port: int = 0
    proof: bytes = b""  # on a secured mesh: the member's signature of its own alive/left claim


@dataclass(frozen=True, slots=True, kw_only=True)
class Echo:
    """Our echo of a peer's last heartbeat: its `sent_at` and how long we held it."""

    sent_at: float
    held_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Holding:
    """A GGUF a node holds on its own disk, by content identity (`actors.gguf.read_layout`)."""

    model_id: str
    identity: str
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Offer:
    """What a node offers dense splits: room for weights and KV cache, and the GGUFs it holds."""

    KIND: ClassVar[str] = "offer"
    memory_bytes: int  # --max-memory
    free_bytes: int  # of which neither its own models nor a stage it serves use
    holdings: list[Holding] = field(default_factory=list)
    stage_for: str = ""  # the head it serves a stage for now ("" for none)
    file_tensors: bool = False  # its llama.cpp can load a stage's tensors from its own files


@dataclass(frozen=True, slots=True, kw_only=True)
class SplitStage:
    """A member of a split: a node and the layers it holds, inclusive."""

    node_id: str
    layers: list[int]  # [first, last]; [] for a head that holds only the output layer
    output: bool = False  # it also holds the output layer
    load_mode: LoadMode | None = None  # how a stage got its weights (None for the head)


@dataclass(frozen=True, slots=True, kw_only=True)
class SplitRow:
    """A dense split as its head tells it (`mesh-ctl splits`)."""

    model: str
    head: str
    epoch: int
    state: SplitStateName
    load_mode: LoadMode
    stages: list[SplitStage]
    detail: str = ""
    bytes_crossed: int = 0  # bytes sent to the stages while they loaded
    # Through the tunnels since: bytes each way and RPC round trips (for per-token costs).
    tunnel_bytes_up: int = 0
    tunnel_bytes_down: int = 0
    round_trips: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class SplitNews:
    """A head's splits, for its gossip actor to publish (in-process only)."""

    KIND: ClassVar[str] = "split_news"
    splits: list[SplitRow]


@dataclass(frozen=True, slots=True, kw_only=True)
class StageClaim:
    """Head → stage node: serve layers first..last of the GGUF `identity` for me. `epoch` 0 asks
    for a new lease; a granted epoch renews it. Answered by `StageGrant`."""

    KIND: ClassVar[str] = "stage_claim"
    request_id: str
    head: str
    identity: str
    first: int
    last: int
    load_mode: LoadMode = "hash-cache"
    epoch: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class StageGrant:
    """Stage node → head: the lease (`epoch`) and the stage's state; `refused` names why."""

    KIND: ClassVar[str] = "stage_grant"
    request_id: str
    epoch: int
    state: StageStateName
    detail: str = ""
    cache_bytes: int = 0  # bytes of RPC cache files the stage built from its own copy


@dataclass(frozen=True, slots=True, kw_only=True)
class StageRelease:
    """Head → stage node: the split dissolved; free the lease `epoch`."""

    KIND: ClassVar[str] = "stage_release"
    head: str
    epoch: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    """What a node publishes on its gossip socket several times a second.

    `view` is membership gossip that also tells peers where to reach nodes they have not
    discovered themselves. `echoes` lets each peer measure its RTT to us; `rtts` gossips the RTTs
    we measured, so every node sees which peers are near each other. `role` is "client" for a node
    with no model or too far from every serving peer (then it lists no models). `instance` is
    new with every start of a node process: two live processes with one node id differ in it.
    """

    KIND: ClassVar[str] = "heartbeat"
    node_id: str
    instance: str
    mesh: str  # a hash of the mesh name
    incarnation: int
    host: str
    zmq_port: int
    http_port: int
    role: str
    models: list[str]
    load: Load
    sent_at: float
    echoes: dict[str, Echo]
    view: list[ViewRow]
    rtts: dict[str, float] = field(default_factory=dict)  # our measured RTT (ms) to each peer
    offer: Offer | None = None  # room and GGUFs for dense splits
    splits: list[SplitRow] = field(default_factory=list)  # the splits we head
    demand: dict[str, Demand] = field(default_factory=dict)  # unmet demand here, per model
    standby_for: list[str] = field(default_factory=list)  # models we hold and could load
    claims: list[str] = field(default_factory=list)  # models we are promoting ourselves to serve
    roster: int = 0  # on a secured mesh: the version of the members' roster we hold


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerSeen:
    """Discovery (mDNS or a --peer seed) found a node's address."""

    KIND: ClassVar[str] = "peer_seen"
    host: str
    zmq_port: int
    node_id: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerRow:
    """One other node as this node sees it (a row of `mesh-ctl peers`)."""

    node_id: str
    host: str
    state: MemberState
    rtt_ms: float | None
    role: str
    models: list[str]
    incarnation: int
    zmq_port: int | None = None
    http_port: int | None = None
    load: Load | None = None
    rtts: dict[str, float] = field(default_factory=dict)
    heard_s_ago: float | None = None  # how old `load` is: the router discounts what it saw end since
    offer: Offer | None = None
    splits: list[SplitRow] = field(default_factory=list)
    demand: dict[str, Demand] = field(default_factory=dict)
    standby_for: list[str] = field(default_factory=list)
    claims: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshView:
    """The gossip actor's picture of the other nodes, for its own node's router (in-process only)."""

    KIND: ClassVar[str] = "mesh_view"
    peers: list[PeerRow]


@dataclass(frozen=True, slots=True, kw_only=True)
class DraftRequest:
    """Engine → speculative drafter: for each row `[seq_id, keep, append, n]`, cut that sequence's
    draft cache to `keep` tokens, feed `append`, and propose `n` tokens."""

    KIND: ClassVar[str] = "draft_request"
    rows: list[list[Any]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Drafted:
    """Drafter → engine: rows `[seq_id, proposed tokens, tokens now in that sequence's draft
    cache]` (possibly fewer tokens than asked; the cache length lets the engine stay in step)."""

    KIND: ClassVar[str] = "drafted"
    rows: list[list[Any]]


MESSAGE_TYPES: tuple[type, ...] = (
    Generate,
    Cancel,
    Accepted,
    Pending,
    Started,
    Chunk,
    Finished,
    ErrorReply,
    Query,
    Answer,
    EngineSpec,
    EngineReady,
    WorkerState,
    Heartbeat,
    PeerSeen,
    MeshView,
    DraftRequest,
    Drafted,
    Offer,
    SplitNews,
    StageClaim,
    StageGrant,
    StageRelease,
)

# Whatever ends a request: after one of these, nothing more arrives for its request id.
TERMINAL_TYPES: tuple[type, ...] = (Finished, ErrorReply)

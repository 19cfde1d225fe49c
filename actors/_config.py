"""Timing and size constants of a node, with their unit in the name and a LAN default.

Tests shrink these by passing a modified `NodeConfig` rather than sleeping longer.
"""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOL_VERSION = (
    5  # 4: offers and splits in heartbeats, stage leases, the RPC tunnel; 5: file-backed stages
)

MAX_BODY_BYTES = 4 * 1024 * 1024  # HTTP request bodies past this get 413 (--max-body-bytes)
MAX_FRAME_BYTES = MAX_BODY_BYTES + 64 * 1024  # the default frame limit: such a body plus framing

# Port layout above --zmq-port (the node's first ZeroMQ port).
CONTROL_PORT_OFFSET = 0  # mesh-ctl talks to the control actor here (default 9338)
ROUTER_PORT_OFFSET = 1  # gateways (and later peer routers) talk to the router here (9339)
GOSSIP_PORT_OFFSET = 2  # the node publishes its heartbeats here (9340)
TUNNEL_PORT_OFFSET = 3  # heads lease stages and tunnel llama.cpp RPC to them here (9341)
ZMQ_PORT_SPAN = 4  # ports a node uses from --zmq-port up


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """Every tunable of one node. Defaults suit a LAN of ordinary machines."""

    max_frame_bytes: int = MAX_FRAME_BYTES  # larger frames are dropped (and counted)
    queue_depth_per_model: int = 16  # requests waiting per model before 429
    retry_after_s: int = 2  # advertised in Retry-After when a queue is full
    actor_start_timeout_s: float = 10.0  # setup (binding sockets) must finish in this
    actor_stop_timeout_s: float = 5.0  # a stopping actor must have joined by then
    engine_load_timeout_s: float = 300.0  # a child that loads longer than this is killed
    engine_restart_backoff_s: float = 0.5  # first wait before restarting a dead engine
    engine_max_restart_backoff_s: float = 10.0  # the wait doubles up to this
    cancel_grace_s: float = 1.0  # an engine that has not stopped this long after a cancel is killed
    engine_max_failed_loads: int = 3  # consecutive failed loads before a worker gives up
    keepalive_interval_s: float = 2.0  # router tells a waiting gateway "still pending" this often
    gateway_idle_timeout_s: float = 15.0  # a gateway that hears nothing this long fails the request
    max_rtt_ms: float = 80.0  # peers farther than this take no inference work from this node
    remote_silence_s: float = 6.0  # a peer silent this long about a forwarded request has failed
    # Gossip and membership (discovery/): a dead node is declared dead in about 4 s on a LAN.
    heartbeat_interval_s: float = 0.25  # how often a node publishes its heartbeat
    # Elastic serving (DESIGN §2.10): unmet demand, standby promotion and stepping back.
    busy_backoff_s: float = 0.1  # a request a busy peer refused waits this long before it is placed again
    demand_tau_s: float = 1.5  # time constant of the average of requests waiting (unmet demand)
    demand_threshold: float = 0.5  # mesh demand (requests waiting on average, 429s/s) that counts
    demand_window_s: float = 10.0  # 429s are counted per second over this window
    demand_ttl_s: float = 1.5  # a peer's demand not refreshed for this long counts no more
    promote_after_s: float = 1.0  # mesh demand above nothing this long: a standby promotes
    step_back_after_s: float = 45.0  # no demand this long: a promoted node steps back
    min_serving_s: float = 20.0  # a promoted node serves at least this long (no flapping)
    claim_timeout_s: float = 300.0  # a promotion that does not serve by then is given up
    suspect_after_s: float = 1.5  # a peer not heard from this long is suspect
    dead_after_s: float = 2.5  # a suspect that does not refute within this long is dead
    tombstone_s: float = 3600.0  # dead/left members are remembered this long to stop ghosts
    rtt_window: int = 9  # RTT is the median of this many samples: one hiccup moves nothing
    leave_flush_s: float = 0.5  # how long a stopping node waits for its `left` to go out
    hello_interval_s: float = 2.0  # a seed (or a peer that does not hear us) is greeted this often
    # Bounds on what the network can make a node hold (a hostile host meets these, not our RAM).
    max_peers: int = 256  # members (tombstones included) a node keeps; newcomers past it are refused
    max_gossip_frame_bytes: int = 1024 * 1024  # heartbeats larger than this are dropped by ZeroMQ
    max_sessions: int = 65536  # sessions whose node the router remembers (least recent forgotten)
    max_warn_keys: int = 1024  # distinct warn-once keys an actor remembers
    # Dense splits (actors/splits/).
    split_wait_for_peers_s: float = 3.0  # a head waits this long for peers before calling a model too big
    lease_renew_s: float = 0.5  # a head renews its stages' leases this often
    lease_lost_s: float = 3.0  # a stage that has not answered a renewal this long is lost to its head
    lease_expiry_s: float = 6.0  # a stage frees a lease its head has not renewed this long
    stall_s: float = 2.0  # no token for this long while a stage is suspect: the head's engine is killed
    max_resumes: int = 3  # times a request resumes after its engine died before it fails
    max_tunnel_connections: int = 64  # open RPC connections a stage tunnels at once

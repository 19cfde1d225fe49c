"""The router actor and its pure parts: admission, placement, forwarding and failover.

- `_router`     the actor: sockets, flights, queues, peer links (glue around the pure parts).
- `_flight`     the router's records: worker slots, requests in flight, counters.
- `_peers`      the router's own table of peers (near/far, load, room), fed by gossip views.
- `_placement`  rendezvous hashing of sessions over nodes.
"""

from actors.routing._router import Router

__all__ = ["Router"]

"""Discovery, gossip, membership and demand.

Map of this room:
- `_mdns`   zeroconf advertising and browsing of `_mesh-llm._tcp.local.` on one interface;
            `Advert` is what a node's TXT record says.

Gossip membership (SWIM-style), RTT and demand come next; until then a node serves alone and
`mesh-ctl peers` is empty.
"""

from discovery._mdns import SERVICE_TYPE, Advert, MdnsDiscovery, mesh_hash

__all__ = ["SERVICE_TYPE", "Advert", "MdnsDiscovery", "mesh_hash"]

"""Discovery, gossip, membership and demand.

Map of this room:
- `_mdns`        zeroconf advertising and browsing of `_mesh-llm._tcp.local.` on one interface;
                 `Advert` is what a node's TXT record says.
- `_membership`  the SWIM-style state machine (alive, suspect, dead, left; incarnations,
                 refutation, tombstones), pure and clock-driven.

Still to come: the gossip actor that runs `Membership` over ZeroMQ PUB/SUB heartbeats, RTT and
demand. Until then a node serves alone and `mesh-ctl peers` is empty.
"""

from discovery._mdns import SERVICE_TYPE, Advert, MdnsDiscovery, mesh_hash
from discovery._membership import Change, Member, Membership, MembershipConfig, State

__all__ = [
    "SERVICE_TYPE",
    "Advert",
    "Change",
    "MdnsDiscovery",
    "Member",
    "Membership",
    "MembershipConfig",
    "State",
    "mesh_hash",
]

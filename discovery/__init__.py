"""Discovery, gossip, membership and demand.

Map of this room:
- `_mdns`        zeroconf advertising and browsing of `_mesh-llm._tcp.local.` on one interface;
                 `Advert` is what a node's TXT record says.
- `_membership`  the SWIM-style state machine (alive, suspect, dead, left; incarnations,
                 refutation, tombstones), pure and clock-driven.
- `_gossip`      the gossip actor: heartbeats over PUB/SUB (zmq_port + 2), membership, RTT
                 (measured and gossiped), latency class (a far node acts as a client only),
                 and what each node offers dense splits and the splits it heads.
- `_mesh`        `MeshMembership`: the gossip actor, mDNS and `--peer` seeds for one node.
- `_trust`       a secured mesh's roster (signed by its authority), invites, and the files a node
                 keeps them in; `Trust`, a node's live keyring and roster.
- `_claims`      a secured mesh's gossip signatures: heartbeats, and members' own claims relayed
                 second-hand.
- `_admission`   joining (`enrol`) and the membership commands (roster, enrol, invite, revoke).

Demand signals and standby promotion live in `_elastic`. (Routing and failover live in the router.)
"""

from discovery._gossip import Gossip
from discovery._mdns import SERVICE_TYPE, Advert, MdnsDiscovery, mesh_hash
from discovery._membership import Change, Member, Membership, State
from discovery._mesh import MeshMembership

__all__ = [
    "SERVICE_TYPE",
    "Advert",
    "Change",
    "Gossip",
    "MdnsDiscovery",
    "Member",
    "Membership",
    "MeshMembership",
    "State",
    "mesh_hash",
]

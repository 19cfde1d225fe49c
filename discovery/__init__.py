"""Discovery, gossip, membership and demand (mDNS via zeroconf, gossip over ZeroMQ PUB/SUB).

Empty until the zero-config mesh lands: a node today serves alone, and `mesh-ctl peers` is empty.
"""

"""The shard-worker: runs on the node's poll loop and never blocks. It owns one engine child
process (supervised: pidfd, restart with back-off, kill on an ignored cancel) and relays the
router's requests to it."""

from actors.shard._worker import ShardWorker

__all__ = ["ShardWorker"]

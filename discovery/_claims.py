"""A secured mesh's gossip signatures: each heartbeat signed by its node, and each member's own
alive/left claim signed by it, so that the claim can travel second-hand (in other members' views)
and still be known for its subject's own word."""

from __future__ import annotations

import dataclasses

import msgpack

from actors.wire._curve import Keyring
from actors.wire._messages import Heartbeat, ViewRow

OWN_CLAIMS = ("alive", "left")  # states only a member may claim of itself


class ClaimSigner:
    """Signs this node's heartbeats and claims, checks other members' (gossip actor's thread)."""

    def __init__(self, keyring: Keyring, mesh: str) -> None:
        self.keyring = keyring
        self.mesh = mesh
        self._own: tuple[tuple[str, int, str, int], bytes] | None = None
        # The last claim verified per member (its key, the claim, the proof): every peer relays
        # the same claim several times a second, and one signature check per claim will do.
        self._verified: dict[str, tuple[bytes, bytes, bytes]] = {}

    def sign(self, frame: bytes) -> bytes:
        return self.keyring.keys.sign(frame)

    def verify_beat(self, beat: Heartbeat, frames: list[bytes]) -> bool:
        return len(frames) == 2 and self.keyring.verify(beat.node_id, frames[0], frames[1])

    def _claim(self, row: ViewRow) -> bytes:
        return msgpack.packb([self.mesh, row.node_id, row.state, row.incarnation, row.host, row.zmq_port])

    def prove(self, row: ViewRow, proofs: dict[tuple[str, int], bytes] | None) -> ViewRow:
        """`row` with the proof of its claim: ours signed now, a peer's as we received it."""
        if row.state not in OWN_CLAIMS:
            return row
        if row.node_id == self.keyring.node_id:
            key = (row.state, row.incarnation, row.host, row.zmq_port)
            if self._own is None or self._own[0] != key:
                self._own = (key, self.keyring.keys.sign(self._claim(row)))
            return dataclasses.replace(row, proof=self._own[1])
        proof = (proofs or {}).get((row.state, row.incarnation), b"")
        return dataclasses.replace(row, proof=proof) if proof else row

    def credible(self, row: ViewRow, *, own_word: bool) -> bool:
        """Whether to hear `row`: about a member; a claim only its subject may make (alive,
        left) carries the subject's signature unless it is the subject's own heartbeat."""
        member = self.keyring.member(row.node_id)
        if member is None:
            return False
        if own_word or row.state not in OWN_CLAIMS:
            return True
        seen = (member.verify_key, self._claim(row), row.proof)
        if self._verified.get(row.node_id) == seen:
            return True
        if not self.keyring.verify(row.node_id, seen[1], row.proof):
            return False
        self._verified[row.node_id] = seen  # one entry per member: bounded by the roster
        return True

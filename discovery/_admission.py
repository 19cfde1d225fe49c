"""Joining a secured mesh and changing who belongs to it.

`Admission.command` answers the control actor's membership commands on a secured node: `roster`
(any member), `enrol` (an invite's connection, on the authority's node), `invite` and `revoke`
(the node's own operator, on the authority's node). `enrol()` is the joining side: it talks to
the authority's node with the invite's key, once, and keeps what it is given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import zmq

from actors import PeerUnavailable, ask
from actors.wire._curve import INVITE_USER, ClientKeys, Member
from discovery._gossip import valid_address
from discovery._trust import NODE_ID, Invite, Roster, Trust, TrustError, TrustFiles

log = logging.getLogger(__name__)
ENROL_TIMEOUT_S = 10.0


class Admission:
    """A secured node's membership commands (called on the control actor's thread)."""

    def __init__(
        self, trust: Trust, *, host: str, zmq_port: int, on_roster: Callable[[], None] | None = None
    ) -> None:
        """`host`, `zmq_port`: where invites tell joining nodes to enrol (this node)."""
        self.trust = trust
        self.host = host
        self.zmq_port = zmq_port
        self.on_roster = on_roster

    def command(self, what: str, args: dict[str, Any], sender: str | None) -> dict[str, Any]:
        try:
            if what == "roster":
                return {"roster": self.trust.signed.hex(), "version": self.trust.keyring.version}
            authority = self.trust.authority
            if authority is None:
                why = "this node does not hold the mesh's authority (the node that created the mesh does)"
                return {"error": f"{what}: {why}"}
            if what == "invite":
                invite = authority.invite(
                    ttl_s=float(args.get("ttl_s", 3600)),
                    uses=int(args.get("uses", 1)),
                    host=self.host,
                    zmq_port=self.zmq_port,
                    server_key=self.trust.keyring.keys.curve_public,
                )
                log.info(
                    "issued an invite (ttl %s s, %s use(s))", args.get("ttl_s", 3600), args.get("uses", 1)
                )
                return {"token": invite.token()}
            if what == "revoke":
                signed = authority.revoke(str(args.get("node_id", "")))
                self.trust.published(signed)
                log.warning(
                    "revoked member %s (roster version %d)", args.get("node_id"), self.trust.keyring.version
                )
                return {"revoked": args.get("node_id"), "version": self.trust.keyring.version}
            if what == "enrol":
                return self._enrol(args, sender)
        except (TrustError, ValueError, TypeError) as err:
            log.warning("membership command %s refused: %s", what, err)
            return {"error": str(err)}
        return {"error": f"unknown membership command {what!r}"}

    def _enrol(self, args: dict[str, Any], sender: str | None) -> dict[str, Any]:
        assert self.trust.authority is not None
        if sender is None or not sender.startswith(INVITE_USER):
            raise TrustError("enrol comes with an invite's key")
        node_id, key = str(args.get("node_id", "")), bytes.fromhex(str(args.get("key", "")))
        if len(key) != 32 or not NODE_ID.fullmatch(node_id):
            raise TrustError("enrol needs a node id (letters, digits, . _ -) and a 32-byte public key")
        host, port = args.get("host"), args.get("zmq_port")
        if not isinstance(host, str) or not isinstance(port, int) or not valid_address(host, port):
            raise TrustError("enrol needs the address the node listens at")
        member = Member(node_id=node_id, verify_key=key, host=host, zmq_port=port)
        signed = self.trust.authority.admit(sender[len(INVITE_USER) :].encode(), member)
        self.trust.published(signed)
        log.info(
            "admitted %s at %s:%s (roster version %d)",
            node_id,
            member.host,
            member.zmq_port,
            self.trust.keyring.version,
        )
        return {"roster": signed.hex()}


def enrol(
    token: str, files: TrustFiles, *, host: str, zmq_port: int, timeout_s: float = ENROL_TIMEOUT_S
) -> Roster:
    """Join the mesh of invite `token` as node `files.node_id` listening at host:zmq_port; keeps
    the credentials in `files`. Raises `TrustError` saying why it could not."""
    invite = Invite.parse(token)
    keys = files.node_keys(create=True)
    ctx = zmq.Context()
    try:
        answer = ask(
            ctx,
            f"tcp://{invite.host}:{invite.zmq_port}",
            "enrol",
            timeout_s=timeout_s,
            args={"node_id": files.node_id, "key": keys.verify_key.hex(), "host": host, "zmq_port": zmq_port},
            keys=ClientKeys(public=invite.public, secret=invite.curve_secret, server=invite.server_key),
        )
    except PeerUnavailable as err:
        raise TrustError(
            f"could not enrol at the mesh's authority {invite.host}:{invite.zmq_port}: {err} "
            "(an expired, used-up or unknown invite is refused there)"
        ) from err
    finally:
        ctx.term()
    if "error" in answer:
        raise TrustError(f"the mesh's authority refused: {answer['error']}")
    try:
        signed = bytes.fromhex(str(answer.get("roster", "")))
    except ValueError as err:
        raise TrustError("the mesh's authority answered with a garbled roster") from err
    return files.joined(invite, signed)

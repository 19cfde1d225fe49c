"""Who belongs to a secured mesh: the roster its authority signs, invites, and the files a node
keeps them in.

The first node of a secured mesh (`serve --secure`) creates the mesh's *authority*, an Ed25519
key that never leaves its state directory. The authority signs the *roster*: a version number,
each member's node id, public key and address, and the keys it revoked. Every node keeps the
newest roster it has verified; a node is admitted on every port (ZAP) exactly while the roster
names it. An *invite* is a one-line token holding a fresh CURVE key pair that the authority's
node admits on its control port only, to enrol (until it expires or its uses run out).

Files, under `<state dir>/trust/` (0700; every file 0600): `node.key` (this node's key),
`authority.pub`, `roster.signed`, `mesh.json` (the mesh's name and its authority's address); on
the authority's node also `authority.key` and `invites.json`.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.public import PrivateKey
from nacl.signing import SigningKey, VerifyKey
from zmq.utils import z85

from actors.wire._curve import Keyring, Member, NodeKeys

log = logging.getLogger(__name__)
TOKEN_PREFIX = "mesh-llm-invite-1."
NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a node id, as state dirs and rosters hold it
MAX_MEMBERS = 1024  # a roster naming more is refused (a bound on what a file can make us hold)
MAX_INVITES = 1000  # invites remembered (the oldest are forgotten first)


class TrustError(Exception):
    """Credentials that cannot be used: missing, unreadable, forged, or for another mesh."""


@dataclass(frozen=True, slots=True)
class Roster:
    """The members of a mesh at one version, as its authority signed them."""

    mesh: str  # the mesh's name
    version: int
    members: tuple[Member, ...] = ()
    revoked: tuple[bytes, ...] = ()  # Ed25519 keys never to admit again
    issued_at: float = 0.0

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "mesh": self.mesh,
                "version": self.version,
                "members": [[m.node_id, m.verify_key, m.host, m.zmq_port] for m in self.members],
                "revoked": list(self.revoked),
                "issued_at": self.issued_at,
            },
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> Roster:
        try:
            raw = msgpack.unpackb(data, raw=False)
            members = tuple(
                Member(node_id=n, verify_key=k, host=h, zmq_port=p)
                for n, k, h, p in raw["members"]
                if isinstance(n, str) and isinstance(k, bytes) and len(k) == 32
                and isinstance(h, str) and isinstance(p, int)
            )  # fmt: skip
            revoked = tuple(k for k in raw["revoked"] if isinstance(k, bytes) and len(k) == 32)
            roster = cls(
                mesh=str(raw["mesh"]),
                version=int(raw["version"]),
                members=members,
                revoked=revoked,
                issued_at=float(raw["issued_at"]),
            )
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as err:
            raise TrustError(f"a garbled roster: {err}") from err
        if len(members) != len(raw["members"]) or len(members) > MAX_MEMBERS:
            raise TrustError("a roster with malformed or too many members")
        return roster

    def member(self, node_id: str) -> Member | None:
        return next((m for m in self.members if m.node_id == node_id), None)


def open_roster(signed: bytes, authority: bytes) -> Roster:
    """The roster in `signed`, if the authority whose public key is `authority` signed it."""
    try:
        return Roster.decode(VerifyKey(authority).verify(signed))
    except (BadSignatureError, ValueError) as err:
        raise TrustError("a roster not signed by this mesh's authority") from err


@dataclass(frozen=True, slots=True)
class Invite:
    """What an invite token carries: where the authority's node is and the key to enrol with."""

    mesh: str
    authority: bytes  # Ed25519 public key of the mesh's authority
    host: str
    zmq_port: int  # the authority node's first port (its control port)
    server_key: bytes  # z85 CURVE key of the authority's node
    secret: bytes  # the invite's CURVE secret key, 32 bytes

    def token(self) -> str:
        body = msgpack.packb(
            [self.mesh, self.authority, self.host, self.zmq_port, self.server_key, self.secret],
            use_bin_type=True,
        )
        return TOKEN_PREFIX + base64.urlsafe_b64encode(body).decode().rstrip("=")

    @classmethod
    def parse(cls, token: str) -> Invite:
        token = token.strip()
        if not token.startswith(TOKEN_PREFIX):
            raise TrustError("not a mesh-llm invite token (made by `mesh-ctl invite`)")
        text = token[len(TOKEN_PREFIX) :]
        try:
            mesh, authority, host, port, server_key, secret = msgpack.unpackb(
                base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), raw=False
            )
            invite = cls(mesh, authority, host, port, server_key, secret)
            if not (len(authority) == 32 and len(secret) == 32 and len(server_key) == 40):
                raise ValueError("bad key lengths")
            if not (isinstance(host, str) and isinstance(port, int) and isinstance(mesh, str)):
                raise ValueError("bad address")
        except (ValueError, TypeError, msgpack.UnpackException) as err:
            raise TrustError(f"a damaged invite token: {err}") from err
        return invite

    @property
    def public(self) -> bytes:
        """The z85 CURVE public key of the invite (its id on the authority's node)."""
        return z85.encode(bytes(PrivateKey(self.secret).public_key))

    @property
    def curve_secret(self) -> bytes:
        return z85.encode(self.secret)


@dataclass(slots=True)
class _InviteRecord:
    expires_at: float  # wall clock; 0: never
    uses: int  # left
    issued_at: float = field(default_factory=time.time)


class Authority:
    """The mesh's authority (on the node that created the mesh): signs rosters, issues and
    honours invites. Not thread-safe: its node calls it from the control actor's thread only
    (invites are checked from ZAP's thread, reading a dict that is replaced, never mutated)."""

    def __init__(self, files: TrustFiles, key: SigningKey, roster: Roster, signed: bytes) -> None:
        self.files = files
        self.key = key
        self.roster = roster
        self.signed = signed  # the very bytes every member holds
        self._invites: dict[bytes, _InviteRecord] = files.read_invites()

    @property
    def public(self) -> bytes:
        return bytes(self.key.verify_key)

    def check_invite(self, key: bytes) -> str | None:
        """None when `key` is a live invite; "expired" or "used up"; KeyError when unknown."""
        record = self._invites[key]
        if record.uses <= 0:
            return "used up"
        if record.expires_at and time.time() > record.expires_at:
            return "expired"
        return None

    def invite(self, *, ttl_s: float, uses: int, host: str, zmq_port: int, server_key: bytes) -> Invite:
        if uses < 1 or ttl_s < 0:
            raise TrustError("an invite needs --uses of at least 1 and a --ttl of at least 0 seconds")
        secret = PrivateKey.generate()
        invite = Invite(self.roster.mesh, self.public, host, zmq_port, server_key, bytes(secret))
        invites = dict(self._invites)
        invites[invite.public] = _InviteRecord(expires_at=time.time() + ttl_s if ttl_s else 0.0, uses=uses)
        self._invites = dict(sorted(invites.items(), key=lambda kv: kv[1].issued_at)[-MAX_INVITES:])
        self.files.write_invites(self._invites)
        return invite

    def admit(self, invite_key: bytes, member: Member) -> bytes:
        """Use one use of a live invite to add `member`; the new signed roster."""
        why_not = self.check_invite(invite_key)
        if why_not is not None:
            raise TrustError(f"the invite is {why_not}")
        if member.verify_key in self.roster.revoked:
            raise TrustError("that key was revoked from this mesh")
        taken = self.roster.member(member.node_id)
        if taken is not None and taken.verify_key != member.verify_key:
            raise TrustError(f"node id {member.node_id} is taken by another member")
        invites = dict(self._invites)
        record = invites[invite_key]
        invites[invite_key] = replace(record, uses=record.uses - 1)
        self._invites = invites
        self.files.write_invites(invites)
        others = tuple(m for m in self.roster.members if m.node_id != member.node_id)
        return self._publish(replace(self.roster, members=(*others, member)))

    def revoke(self, node_id: str) -> bytes:
        """Remove `node_id` from the mesh for good; the new signed roster."""
        gone = self.roster.member(node_id)
        if gone is None:
            raise TrustError(f"{node_id} is not a member of this mesh")
        if gone.verify_key == self.public or node_id == self.files.node_id:
            raise TrustError("the authority's own node cannot be revoked")
        members = tuple(m for m in self.roster.members if m.node_id != node_id)
        return self._publish(
            replace(self.roster, members=members, revoked=(*self.roster.revoked, gone.verify_key))
        )

    def _publish(self, roster: Roster) -> bytes:
        self.roster = replace(roster, version=roster.version + 1, issued_at=time.time())
        self.signed = bytes(self.key.sign(self.roster.encode()))
        self.files.write_roster(self.signed)
        return self.signed


@dataclass(frozen=True, slots=True)
class TrustFiles:
    """The trust files of one state directory."""

    state_dir: Path
    node_id: str

    @property
    def dir(self) -> Path:
        return self.state_dir / "trust"

    def exists(self) -> bool:
        return (self.dir / "roster.signed").exists()

    def _write(self, name: str, data: bytes) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        path = self.dir / name
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _read(self, name: str) -> bytes:
        path = self.dir / name
        try:
            return path.read_bytes()
        except OSError as err:
            raise TrustError(f"cannot read {path}: {err.strerror}") from err

    def node_keys(self, *, create: bool = False) -> NodeKeys:
        path = self.dir / "node.key"
        if not path.exists() and create:
            keys = NodeKeys.generate()
            self._write("node.key", keys.seed)
            return keys
        seed = self._read("node.key")
        if len(seed) != 32:
            raise TrustError(f"{path} is not a node key")
        return NodeKeys(seed)

    def write_roster(self, signed: bytes) -> None:
        self._write("roster.signed", signed)

    def roster(self) -> tuple[bytes, Roster]:
        signed = self._read("roster.signed")
        return signed, open_roster(signed, self.authority_public())

    def authority_public(self) -> bytes:
        key = self._read("authority.pub")
        if len(key) != 32:
            raise TrustError("authority.pub is not a public key")
        return key

    def authority(self, roster: Roster, signed: bytes) -> Authority | None:
        """The mesh's authority over `roster` (as read from here), if this directory holds its key."""
        if not (self.dir / "authority.key").exists():
            return None
        return Authority(self, SigningKey(self._read("authority.key")), roster, signed)

    def mesh(self) -> dict[str, Any]:
        try:
            data = json.loads(self._read("mesh.json"))
        except ValueError as err:
            raise TrustError(f"{self.dir / 'mesh.json'} is garbled") from err
        if not isinstance(data, dict) or not isinstance(data.get("mesh"), str):
            raise TrustError(f"{self.dir / 'mesh.json'} names no mesh")
        return data

    def write_mesh(self, mesh: str, host: str, zmq_port: int) -> None:
        self._write("mesh.json", json.dumps({"mesh": mesh, "host": host, "zmq_port": zmq_port}).encode())

    def read_invites(self) -> dict[bytes, _InviteRecord]:
        path = self.dir / "invites.json"
        if not path.exists():
            return {}
        try:
            raw = json.loads(path.read_text())
            return {k.encode(): _InviteRecord(**v) for k, v in raw.items()}
        except (OSError, ValueError, TypeError) as err:
            raise TrustError(f"{path} is garbled: {err}") from err

    def write_invites(self, invites: dict[bytes, _InviteRecord]) -> None:
        raw = {
            k.decode(): {"expires_at": r.expires_at, "uses": r.uses, "issued_at": r.issued_at}
            for k, r in invites.items()
        }
        self._write("invites.json", json.dumps(raw).encode())

    # -- making a mesh, joining one --------------------------------------------------------

    def create_mesh(self, mesh: str, host: str, zmq_port: int) -> None:
        """Make this node the authority of a new secured mesh named `mesh`, and its first member."""
        keys = self.node_keys(create=True)
        authority = SigningKey.generate()
        self._write("authority.key", bytes(authority))
        self._write("authority.pub", bytes(authority.verify_key))
        me = Member(node_id=self.node_id, verify_key=keys.verify_key, host=host, zmq_port=zmq_port)
        roster = Roster(mesh=mesh, version=1, members=(me,), issued_at=time.time())
        self.write_roster(bytes(authority.sign(roster.encode())))
        self.write_mesh(mesh, host, zmq_port)

    def joined(self, invite: Invite, signed: bytes) -> Roster:
        """Keep what enrolling with `invite` gave us; the roster, checked to name this node."""
        roster = open_roster(signed, invite.authority)
        me = roster.member(self.node_id)
        if me is None or me.verify_key != self.node_keys().verify_key or roster.mesh != invite.mesh:
            raise TrustError("the authority's answer does not admit this node")
        self._write("authority.pub", invite.authority)
        self.write_roster(signed)
        self.write_mesh(invite.mesh, invite.host, invite.zmq_port)
        return roster


class Trust:
    """A secured node's live trust state: its keyring, the roster behind it, its authority (on
    the authority's node). `adopt()` takes a newer roster from a peer."""

    def __init__(self, files: TrustFiles) -> None:
        self.files = files
        self.authority_public = files.authority_public()
        self.signed, roster = files.roster()
        self.mesh = roster.mesh
        self.authority = files.authority(roster, self.signed)
        if self.authority is not None and self.authority.public != self.authority_public:
            raise TrustError("authority.key does not match authority.pub")
        check = self.authority.check_invite if self.authority is not None else None
        self.keyring = Keyring(files.node_id, files.node_keys(), invites=check)
        self._take(roster)

    def _take(self, roster: Roster) -> None:
        self.keyring.update(roster.version, roster.members, roster.revoked)

    def adopt(self, signed: bytes) -> bool:
        """Take `signed` if it is a newer roster of our mesh signed by our authority (any thread
        that owns this node's trust updates: the gossip actor's); True if it was."""
        try:
            roster = open_roster(signed, self.authority_public)
        except TrustError as err:
            log.warning("refused a roster: %s", err)
            return False
        if roster.mesh != self.mesh or roster.version <= self.keyring.version:
            return False
        self.files.write_roster(signed)
        self.signed = signed
        self._take(roster)
        log.info(
            "roster version %d: %d members, %d revoked",
            roster.version,
            len(roster.members),
            len(roster.revoked),
        )
        return True

    def published(self, signed: bytes) -> None:
        """The authority (this node's) signed a new roster: take it."""
        self.signed = signed
        self._take(open_roster(signed, self.authority_public))

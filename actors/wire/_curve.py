"""CURVE and ZAP for a secured node: its keys, the members it admits, and the two calls through
which every network socket of the node binds (`listen`) or connects (`dial`).

A node's identity is one Ed25519 key (PyNaCl): it signs the node's gossip, and its Curve25519
form is the node's CURVE key pair. A `Keyring` holds the members of the mesh (node id -> keys,
from the roster the mesh's authority signs) and the keys revoked; pyzmq's ZAP authenticator asks
it about every incoming connection (`ThreadAuthenticator`, its own thread). Which plane a
connection is for travels as the ZAP domain, so a refusal names the plane. Open meshes (no
keyring registered for the context) bind and connect plainly.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import zmq
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

log = logging.getLogger(__name__)

PLANES = ("control", "router", "gossip", "tunnel")  # the ZAP domains, one per LAN-facing port
INVITE_USER = "invite:"  # User-Id prefix of a connection made with an invite's key
_MAX_LOGGED = 1024  # distinct refusals logged at WARNING (keys come from the network)


class NotAMember(Exception):
    """A secured node was asked to connect to a node that is not a member of its mesh."""


def curve_public(verify_key: bytes) -> bytes:
    """The z85 CURVE public key of the node whose Ed25519 public key is `verify_key`."""
    return z85.encode(bytes(VerifyKey(verify_key).to_curve25519_public_key()))


class NodeKeys:
    """One node's key: signs its gossip; its Curve25519 form is its CURVE key pair."""

    def __init__(self, seed: bytes) -> None:
        self.signing = SigningKey(seed)
        self.verify_key = bytes(self.signing.verify_key)
        private = self.signing.to_curve25519_private_key()
        self.curve_secret = z85.encode(bytes(private))
        self.curve_public = z85.encode(bytes(private.public_key))

    @classmethod
    def generate(cls) -> NodeKeys:
        return cls(bytes(SigningKey.generate()))

    @property
    def seed(self) -> bytes:
        return bytes(self.signing)

    def sign(self, payload: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `payload`."""
        return self.signing.sign(payload).signature


@dataclass(frozen=True, slots=True)
class Member:
    """A node admitted to the mesh: its id, key, and where it said it listens."""

    node_id: str
    verify_key: bytes  # Ed25519, 32 bytes
    host: str = ""
    zmq_port: int = 0

    @property
    def curve_key(self) -> bytes:
        return curve_public(self.verify_key)


# An invite's check, on the authority's node: the z85 key of a connection -> None when it is a
# live invite, else why not ("expired", "used up"); no answer at all (KeyError) when unknown.
InviteCheck = Callable[[bytes], str | None]


class Keyring:
    """What a secured node trusts: its own keys, the mesh's members, the keys revoked.

    Read from any thread (ZAP's, actors'); `update()` swaps whole tables, so a reader sees the
    old set or the new one, never a mix."""

    def __init__(self, node_id: str, keys: NodeKeys, *, invites: InviteCheck | None = None) -> None:
        self.node_id = node_id
        self.keys = keys
        self.invites = invites
        self.version = 0  # of the roster the members came from
        self._members: dict[str, Member] = {}
        self._by_curve: dict[bytes, str] = {}
        self._revoked: frozenset[bytes] = frozenset()
        self._on_update: list[Callable[[frozenset[str]], None]] = []
        self._logged: set[tuple[str, bytes, str]] = set()

    # -- the tables -------------------------------------------------------------------------

    def update(self, version: int, members: Iterable[Member], revoked: Iterable[bytes]) -> None:
        """Take the members and revoked keys of roster `version`; listeners hear who was removed."""
        table = {m.node_id: m for m in members}
        gone = frozenset(self._members) - frozenset(table)
        self._members = table
        self._by_curve = {m.curve_key: m.node_id for m in table.values()}
        self._revoked = frozenset(curve_public(k) for k in revoked)
        self.version = version
        for listener in list(self._on_update):
            listener(gone)

    def on_update(self, listener: Callable[[frozenset[str]], None]) -> None:
        """Call `listener(removed node ids)` after every update (on the updating thread)."""
        self._on_update.append(listener)

    def member(self, node_id: str) -> Member | None:
        return self._members.get(node_id)

    def members(self) -> dict[str, Member]:
        return dict(self._members)

    def at(self, host: str, zmq_port: int) -> Member | None:
        """The member that said it listens at that address (for `--peer` seeds)."""
        return next((m for m in self._members.values() if (m.host, m.zmq_port) == (host, zmq_port)), None)

    def admits(self, user_id: str | None) -> bool:
        """Whether messages from a connection authenticated as `user_id` are still welcome (a
        member revoked since its connection was made is not)."""
        return user_id is not None and user_id in self._members

    # -- ZAP ----------------------------------------------------------------------------------

    def judge(self, plane: str, key: bytes) -> tuple[str | None, str]:
        """(the connection's user id, or None) and why, for a CURVE client `key` on `plane`."""
        if key in self._revoked:
            return None, f"the key of a revoked member ({key[:8].decode()}...)"
        node_id = self._by_curve.get(key)
        if node_id is not None:
            return node_id, "member"
        if self.invites is not None:
            try:
                why_not = self.invites(key)
            except KeyError:
                why_not = "unknown"
            if why_not is None:
                if plane == "control":
                    return INVITE_USER + key.decode(), "invite"
                return None, "an invite's key, which may only enrol on the control port"
            if why_not != "unknown":
                return None, f"an invite that is {why_not}"
        return None, f"an unknown key ({key[:8].decode()}...), not a member of this mesh"

    def refuse(self, plane: str, address: str, key: bytes, why: str) -> None:
        """Log a refused connection: at WARNING the first time for its plane, key and reason
        (called on ZAP's thread only; the socket monitors count refusals per actor)."""
        fresh = (plane, key, why) not in self._logged and len(self._logged) < _MAX_LOGGED
        if fresh:
            self._logged.add((plane, key, why))
        log.log(
            logging.WARNING if fresh else logging.DEBUG,
            "refused a connection to the %s port from %s: %s",
            plane,
            address,
            why,
        )

    # -- signatures ---------------------------------------------------------------------------

    def verify(self, node_id: str, payload: bytes, signature: bytes) -> bool:
        """Whether `signature` is member `node_id`'s over `payload`."""
        member = self._members.get(node_id)
        if member is None or len(signature) != 64:
            return False
        try:
            VerifyKey(member.verify_key).verify(payload, signature)
        except (BadSignatureError, ValueError):
            return False
        return True


class _Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler, asking the keyring; the User-Id of a member's connection is its id."""

    def __init__(self, ctx: zmq.Context, keyring: Keyring) -> None:
        super().__init__(ctx, log=logging.getLogger(f"{__name__}.zap"))
        self.keyring = keyring
        self._address = ""
        self._user: dict[bytes, str] = {}

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        user, why = self.keyring.judge(domain, key)
        if user is None:
            self.keyring.refuse(domain, self._address, key, why)
            return False
        self._user[key] = user
        return True

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self._user.pop(z85.encode(client_public_key), "")


_SECURED: weakref.WeakKeyDictionary[zmq.Context, tuple[Keyring, _Authenticator]] = weakref.WeakKeyDictionary()


def secure(ctx: zmq.Context, keyring: Keyring) -> None:
    """Make every socket of `ctx` that `listen`s or `dial`s over the network use CURVE, admitted
    by `keyring` (ZAP). Call before any of them binds; `unsecure(ctx)` before `ctx.term()`."""
    auth = _Authenticator(ctx, keyring)
    auth.start()
    for plane in PLANES:
        auth.configure_curve_callback(plane, auth)
    _SECURED[ctx] = (keyring, auth)


def unsecure(ctx: zmq.Context) -> None:
    """Stop the context's ZAP handler (idempotent)."""
    entry = _SECURED.pop(ctx, None)
    if entry is not None:
        entry[1].stop()


def keyring_of(ctx: zmq.Context) -> Keyring | None:
    entry = _SECURED.get(ctx)
    return entry[0] if entry is not None else None


def listen(sock: zmq.Socket, endpoint: str, plane: str) -> Keyring | None:
    """Bind `sock` for `plane`; on a secured context as a CURVE server admitting members only.
    Returns the keyring that admits its peers (None: an open socket)."""
    keyring = keyring_of(sock.context) if endpoint.startswith("tcp://") else None
    if keyring is not None:
        if plane not in PLANES:
            raise ValueError(f"unknown plane {plane!r}")
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, keyring.keys.curve_secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, plane.encode())
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler: refuse, never admit
    sock.bind(endpoint)
    return keyring


def dial(
    sock: zmq.Socket, endpoint: str, node_id: str | None = None, *, server_key: bytes | None = None
) -> None:
    """Connect `sock` to node `node_id` at `endpoint`; on a secured context as a CURVE client that
    checks it is that member (raises `NotAMember` for a node the keyring does not hold)."""
    keyring = keyring_of(sock.context) if endpoint.startswith("tcp://") else None
    if keyring is not None:
        if server_key is None:
            member = keyring.member(node_id) if node_id is not None else None
            if member is None:
                raise NotAMember(f"{node_id or endpoint} is not a member of this mesh")
            server_key = member.curve_key
        set_client_keys(sock, keyring.keys.curve_public, keyring.keys.curve_secret, server_key)
    sock.connect(endpoint)


def set_client_keys(sock: zmq.Socket, public: bytes, secret: bytes, server_key: bytes) -> None:
    """Make `sock`'s next connections CURVE clients with this key pair, to the server `server_key`."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """Credentials of a process outside a node's actors (mesh-ctl, an enrolling node): a CURVE
    key pair and the key of the server it talks to (all z85)."""

    public: bytes
    secret: bytes
    server: bytes


HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def describe_failure(event: dict[str, Any]) -> str:
    """What a monitor's handshake-failure event means, for the log."""
    kind = event.get("event")
    if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "its key was refused"
    if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return "no CURVE handshake (an unauthenticated peer, or one that does not know our key)"
    return "the handshake did not complete (no CURVE handshake: an unauthenticated peer, or one that gave up)"

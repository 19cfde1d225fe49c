"""The credentials of a secured mesh, without processes: rosters signed and checked, invites made,
spent and expired, revocation, the keyring's ZAP decisions, the signed claims of gossip, and
CURVE over real sockets with pyzmq's authenticator."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import zmq

from actors.wire._curve import Keyring, Member, NodeKeys, NotAMember, dial, listen, secure, unsecure
from actors.wire._messages import ViewRow
from discovery._admission import Admission
from discovery._claims import ClaimSigner
from discovery._trust import Authority, Invite, Roster, Trust, TrustError, TrustFiles, open_roster


def _mesh(tmp: Path, node_id: str = "first") -> Trust:
    files = TrustFiles(tmp / node_id, node_id)
    files.create_mesh("lab", "10.0.0.1", 9338)
    return Trust(files)


def _member(node_id: str) -> tuple[NodeKeys, Member]:
    keys = NodeKeys.generate()
    return keys, Member(node_id=node_id, verify_key=keys.verify_key, host="10.0.0.9", zmq_port=9338)


def _authority(trust: Trust) -> Authority:
    assert trust.authority is not None
    return trust.authority


def _invite(trust: Trust, *, ttl_s: float = 0, uses: int = 1) -> Invite:
    return _authority(trust).invite(
        ttl_s=ttl_s, uses=uses, host="h", zmq_port=1, server_key=trust.keyring.keys.curve_public
    )


def _joined(trust: Trust, node_id: str) -> tuple[NodeKeys, Keyring]:
    """A member admitted with an invite of its own: its keys, and its keyring (the new roster)."""
    keys, member = _member(node_id)
    trust.published(_authority(trust).admit(_invite(trust).public, member))
    ring = Keyring(node_id, keys)
    ring.update(trust.keyring.version, trust.keyring.members().values(), ())
    return keys, ring


def test_a_new_mesh_keeps_private_files_and_names_its_first_node(tmp_path: Path) -> None:
    trust = _mesh(tmp_path)
    assert trust.authority is not None and trust.keyring.version == 1
    assert set(trust.keyring.members()) == {"first"}
    folder = tmp_path / "first" / "trust"
    assert folder.stat().st_mode & 0o777 == 0o700
    assert {f.name for f in folder.iterdir()} == {
        "node.key",
        "authority.key",
        "authority.pub",
        "roster.signed",
        "mesh.json",
    }
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in folder.iterdir())


def test_a_roster_signed_by_another_key_or_altered_is_refused(tmp_path: Path) -> None:
    trust = _mesh(tmp_path)
    other = _mesh(tmp_path, "other")
    with pytest.raises(TrustError, match="not signed"):
        open_roster(other.signed, trust.authority_public)
    altered = bytearray(trust.signed)
    altered[-3] ^= 1
    with pytest.raises(TrustError):
        open_roster(bytes(altered), trust.authority_public)
    assert not trust.adopt(other.signed) and not trust.adopt(b"\x00" * 80)
    assert not trust.adopt(trust.signed), "not newer"
    with pytest.raises(TrustError):
        Roster.decode(b"\xc1")


def test_an_invite_admits_one_key_per_use_until_it_is_used_up_or_expires(tmp_path: Path) -> None:
    trust = _mesh(tmp_path)
    authority = _authority(trust)
    invite = authority.invite(
        ttl_s=60, uses=2, host="10.0.0.1", zmq_port=9338, server_key=trust.keyring.keys.curve_public
    )
    parsed = Invite.parse(invite.token())
    assert parsed == invite and len(invite.token().splitlines()) == 1
    assert authority.check_invite(invite.public) is None
    for n in ("b", "c"):
        trust.published(authority.admit(invite.public, _member(n)[1]))
    assert authority.check_invite(invite.public) == "used up"
    with pytest.raises(TrustError, match="used up"):
        authority.admit(invite.public, _member("d")[1])
    assert set(trust.keyring.members()) == {"first", "b", "c"} and trust.keyring.version == 3
    short = _invite(trust, ttl_s=0.05)
    time.sleep(0.1)
    assert authority.check_invite(short.public) == "expired"
    with pytest.raises(KeyError):
        authority.check_invite(b"x" * 40)
    # Invites outlive a restart of the authority's node.
    again = Trust(trust.files)
    assert again.authority is not None and again.authority.check_invite(invite.public) == "used up"


def test_damaged_tokens_are_refused_with_a_reason() -> None:
    for token in ("", "hello", "mesh-llm-invite-1.", "mesh-llm-invite-1.!!!!", "mesh-llm-invite-1.AAAA"):
        with pytest.raises(TrustError):
            Invite.parse(token)


def test_revocation_removes_a_member_for_good_and_spares_the_authority(tmp_path: Path) -> None:
    trust = _mesh(tmp_path)
    authority = _authority(trust)
    invite = _invite(trust, uses=3)
    keys, member = _member("b")
    trust.published(authority.admit(invite.public, member))
    removed: list[frozenset[str]] = []
    trust.keyring.on_update(removed.append)
    trust.published(authority.revoke("b"))
    assert removed == [frozenset({"b"})]
    assert trust.keyring.judge("router", keys.curve_public)[0] is None
    assert "revoked" in trust.keyring.judge("router", keys.curve_public)[1]
    with pytest.raises(TrustError, match="revoked"):
        authority.admit(invite.public, member)  # the same key cannot come back
    with pytest.raises(TrustError, match="cannot be revoked"):
        authority.revoke("first")
    with pytest.raises(TrustError, match="not a member"):
        authority.revoke("nobody")
    with pytest.raises(TrustError, match="taken"):
        authority.admit(invite.public, _member("first")[1])


def test_the_keyring_admits_members_everywhere_and_live_invites_only_to_enrol(tmp_path: Path) -> None:
    trust = _mesh(tmp_path)
    ring = trust.keyring
    me = ring.keys.curve_public
    assert ring.judge("gossip", me) == ("first", "member")
    stranger = NodeKeys.generate().curve_public
    assert ring.judge("tunnel", stranger)[0] is None and "unknown key" in ring.judge("tunnel", stranger)[1]
    invite = _invite(trust, ttl_s=60)
    assert ring.judge("control", invite.public)[0] == f"invite:{invite.public.decode()}"
    assert "only enrol" in ring.judge("router", invite.public)[1]


def test_gossip_claims_travel_second_hand_only_with_their_subject_s_signature(tmp_path: Path) -> None:
    trust = _mesh(tmp_path)
    _, b_ring = _joined(trust, "b")
    b_signer, our_signer = ClaimSigner(b_ring, "mesh"), ClaimSigner(trust.keyring, "mesh")
    row = ViewRow(node_id="b", state="alive", incarnation=7, host="10.0.0.9", zmq_port=9338)
    proven = b_signer.prove(row, None)
    assert len(proven.proof) == 64
    assert our_signer.credible(proven, own_word=False)
    assert not our_signer.credible(row, own_word=False), "unsigned"
    for forged in (
        ViewRow(
            node_id="b", state="alive", incarnation=8, host="10.0.0.9", zmq_port=9338, proof=proven.proof
        ),
        ViewRow(node_id="b", state="left", incarnation=7, host="10.0.0.9", zmq_port=9338, proof=proven.proof),
        ViewRow(
            node_id="b", state="alive", incarnation=7, host="10.6.6.6", zmq_port=9338, proof=proven.proof
        ),
    ):
        assert not our_signer.credible(forged, own_word=False), forged
    assert our_signer.credible(ViewRow(node_id="b", state="suspect", incarnation=7), own_word=False)
    assert not our_signer.credible(ViewRow(node_id="ghost", state="dead", incarnation=1), own_word=False)


def test_curve_sockets_admit_members_and_refuse_others(tmp_path: Path) -> None:
    trust = _mesh(tmp_path)
    _, b_ring = _joined(trust, "b")
    server_ctx, member_ctx, plain_ctx = zmq.Context(), zmq.Context(), zmq.Context()
    secure(server_ctx, trust.keyring)
    secure(member_ctx, b_ring)
    sockets = []
    try:
        server = server_ctx.socket(zmq.ROUTER)
        sockets.append(server)
        listen(server, "tcp://127.0.0.1:*", "router")
        endpoint = server.getsockopt(zmq.LAST_ENDPOINT).decode()
        member = member_ctx.socket(zmq.DEALER)
        plain = plain_ctx.socket(zmq.DEALER)
        sockets += [member, plain]
        dial(member, endpoint, "first")
        plain.connect(endpoint)
        plain.send(b"plain")
        member.send(b"member")
        assert server.poll(5000)
        frames = server.recv_multipart(copy=False)
        assert frames[-1].bytes == b"member" and frames[-1].get("User-Id") == "b"
        assert not server.poll(500), "the unauthenticated peer got through"
        other = member_ctx.socket(zmq.DEALER)
        sockets.append(other)
        with pytest.raises(NotAMember, match="not a member"):
            dial(other, endpoint, "nobody")
    finally:
        for sock in sockets:
            sock.close(linger=0)
        unsecure(server_ctx)
        unsecure(member_ctx)
        for ctx in (server_ctx, member_ctx, plain_ctx):
            ctx.term()


def test_enrolment_takes_a_live_invite_once_and_refuses_malformed_requests(tmp_path: Path) -> None:
    trust = _mesh(tmp_path)
    admission = Admission(trust, host="10.0.0.1", zmq_port=9338)
    invite = _invite(trust, ttl_s=60)
    sender = f"invite:{invite.public.decode()}"
    key = NodeKeys.generate().verify_key.hex()
    good = {"node_id": "b-1", "key": key, "host": "10.0.0.9", "zmq_port": 9338}
    for bad in (
        {**good, "key": "zz"},
        {**good, "key": "00" * 31},
        {**good, "node_id": ""},
        {**good, "node_id": "../../etc"},
        {**good, "node_id": "x" * 200},
        {**good, "host": "tcp://evil;rm"},
        {**good, "zmq_port": "9338"},
        {**good, "zmq_port": 70000},
        {k: v for k, v in good.items() if k != "key"},
    ):
        answer = admission.command("enrol", bad, sender)
        assert "error" in answer, bad
    assert "error" in admission.command("enrol", good, None), "enrol needs an invite's connection"
    assert "error" in admission.command("enrol", good, "b-1")
    assert set(trust.keyring.members()) == {"first"}, "no malformed request changed the roster"
    answer = admission.command("enrol", good, sender)
    assert "roster" in answer and "b-1" in trust.keyring.members()
    assert "used up" in admission.command("enrol", {**good, "node_id": "c"}, sender)["error"]
    assert "error" in admission.command("revoke", {"node_id": 5}, "first")

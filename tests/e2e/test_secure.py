"""Secured meshes with real node processes: invited nodes join and serve; everyone else — no key,
a wrong key, a revoked member, an expired or used-up invite — is refused on every port (control,
router, gossip, split tunnel), receives nothing and is named in the node's log. API keys guard
every way to start generation on an open mesh."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import zmq

from actors import Generate, Query, decode, encode
from actors.wire._curve import ClientKeys, NodeKeys, set_client_keys
from actors.wire._messages import ErrorReply, StageClaim
from discovery._trust import Invite, TrustFiles
from gateway.ctl._main import credentials
from tests.support.nodes import BIN, NodeProcess, eventually, launch, start_node, stop_process, wait_http

pytestmark = pytest.mark.slow
MODEL = "tiny-llama"
PLANES = {"control": 0, "router": 1, "gossip": 2, "tunnel": 3}  # port offsets from --zmq-port


def _message(plane: str) -> bytes:
    """What a client of each port would send first (each is answered when it is accepted)."""
    if plane == "control":
        return encode(Query(request_id="q", what="status"))
    if plane == "router":
        return encode(Generate(request_id="stolen", model=MODEL, prompt="a secret prompt", max_tokens=4))
    return encode(StageClaim(request_id="c", head="intruder", identity="x", first=0, last=0))


class Attempt:
    """One connection to one port of a node, with some credentials (or none), counting what it
    receives: a reply on control/router/tunnel, a heartbeat on gossip."""

    def __init__(self, ctx: zmq.Context, zmq_port: int, plane: str, keys: ClientKeys | None) -> None:
        self.plane = plane
        self.sock = ctx.socket(zmq.SUB if plane == "gossip" else zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            set_client_keys(self.sock, keys.public, keys.secret, keys.server)
        if plane == "gossip":
            self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(f"tcp://127.0.0.1:{zmq_port + PLANES[plane]}")
        if plane != "gossip":
            self.sock.send(_message(plane))

    def received(self) -> int:
        count = 0
        while self.sock.poll(0):
            self.sock.recv_multipart()
            count += 1
        self.sock.close()
        return count


def _attempt_all(
    zmq_port: int, cases: dict[str, ClientKeys | None], wait_s: float = 2.5
) -> dict[tuple[str, str], int]:
    """Every case on every plane at once; what each received after `wait_s`."""
    ctx = zmq.Context()
    try:
        attempts = {
            (case, plane): Attempt(ctx, zmq_port, plane, keys)
            for case, keys in cases.items()
            for plane in PLANES
        }
        time.sleep(wait_s)
        return {key: attempt.received() for key, attempt in attempts.items()}
    finally:
        ctx.term()


def _join(tmp: Path, token: str, authority: NodeProcess, model: Path | None = None) -> NodeProcess:
    node = launch(tmp, model, "--join", token, "--peer", f"127.0.0.1:{authority.zmq_port}", "--no-mdns")
    try:
        node.wait_ready()
        wait_http(node)
    except BaseException:
        node.stop()
        raise
    return node


@pytest.fixture
def authority(tmp_path: Path, tiny_model: Path) -> Iterator[NodeProcess]:
    node = start_node(tmp_path, tiny_model, "--secure", "--no-mdns")
    try:
        yield node
    finally:
        node.stop()


def test_an_invited_node_joins_a_secured_mesh_and_is_served_through_it(
    authority: NodeProcess, tmp_path: Path
) -> None:
    token = authority.invite("--uses", "1")
    assert token.startswith("mesh-llm-invite-1.") and len(token.splitlines()) == 1
    trust = authority.state / "trust"  # type: ignore[operator]
    assert (trust.stat().st_mode & 0o777) == 0o700
    assert all((f.stat().st_mode & 0o777) == 0o600 for f in trust.iterdir()), "credentials are private files"
    client = _join(tmp_path, token, authority)
    try:
        assert client.status()["secure"] is True
        eventually(lambda: client.status()["mesh_models"].__contains__(MODEL), 20, client.status)
        oai = openai.OpenAI(base_url=f"{client.url}/v1", api_key="unused", max_retries=0, timeout=60)
        answer = oai.completions.create(model=MODEL, prompt="hello", max_tokens=4, temperature=0)
        assert answer.choices[0].text and answer.usage and answer.usage.completion_tokens == 4
        # It joined once and remembers: restarted without the token, it is still a member.
        client.stop()
        again = launch(
            tmp_path, None, "--peer", f"127.0.0.1:{authority.zmq_port}", "--no-mdns", zmq_port=client.zmq_port
        )
        try:
            again.wait_ready()
            assert again.status()["secure"] is True
            eventually(lambda: again.status()["mesh_models"].__contains__(MODEL), 20, again.status)
        finally:
            again.stop()
    finally:
        client.stop()


def test_every_port_refuses_no_key_a_wrong_key_a_revoked_member_and_spent_invites(
    authority: NodeProcess, tmp_path: Path
) -> None:
    used = authority.invite("--uses", "1")
    member = _join(tmp_path, used, authority)  # uses the invite up
    expired = authority.invite("--ttl", "1")
    revokee = _join(tmp_path, authority.invite(), authority)
    try:
        server = credentials(authority.state, authority.control).server  # type: ignore[arg-type]
        revokee_id = revokee.status()["node_id"]
        revoked_keys = TrustFiles(revokee.state, revokee_id).node_keys()  # type: ignore[arg-type]
        out = authority.ctl("revoke", revokee_id)
        assert out.returncode == 0, out.stderr
        stranger = NodeKeys.generate()

        def keys_of(invite: str) -> ClientKeys:
            parsed = Invite.parse(invite)
            return ClientKeys(public=parsed.public, secret=parsed.curve_secret, server=server)

        time.sleep(1.2)  # the short invite has expired
        cases: dict[str, ClientKeys | None] = {
            "no key": None,
            "a wrong key": ClientKeys(
                public=stranger.curve_public, secret=stranger.curve_secret, server=server
            ),
            "a revoked member": ClientKeys(
                public=revoked_keys.curve_public, secret=revoked_keys.curve_secret, server=server
            ),
            "an expired invite": keys_of(expired),
            "a used-up invite": keys_of(used),
        }
        got = _attempt_all(authority.zmq_port, cases)
        assert got == dict.fromkeys(got, 0), f"messages accepted: {got}"
        log = authority.log_path.read_text(errors="replace")
        why = {
            "no key": "no CURVE handshake",  # (the mechanism mismatch, or a handshake cut short)
            "a wrong key": "an unknown key",
            "a revoked member": "the key of a revoked member",
            "an expired invite": "an invite that is expired",
            "a used-up invite": "an invite that is used up",
        }
        for case, reason in why.items():
            for plane in PLANES:
                assert any(
                    f"refused a connection to the {plane} port" in line and reason in line
                    for line in log.splitlines()
                ), f"{case} on {plane}: no log line naming the refusal"
        # The same harness with a member's key is answered on every port: it can see acceptance.
        mine = TrustFiles(member.state, member.status()["node_id"]).node_keys()  # type: ignore[arg-type]
        accepted = _attempt_all(
            authority.zmq_port,
            {"member": ClientKeys(public=mine.curve_public, secret=mine.curve_secret, server=server)},
        )
        assert all(n > 0 for n in accepted.values()), accepted
        # The used-up invite cannot enrol again; the revoked member is out of everyone's view.
        late = launch(tmp_path, None, "--join", used, "--no-mdns")
        assert late.proc.wait(30) == 1
        assert "could not enrol" in late.log_path.read_text()
        eventually(
            lambda: all(
                p["state"] != "alive" for p in authority.status()["peers"] if p["node_id"] == revokee_id
            ),
            15,
            lambda: authority.status()["peers"],
        )
        # mesh-ctl without the node's credentials is told what is missing.
        bare = authority.ctl("--state-dir", str(tmp_path / "nowhere"), "status")
        assert bare.returncode == 1 and "is not a node's state directory" in bare.stderr
    finally:
        member.stop()
        stop_process(revokee.proc)


def test_mesh_ctl_without_credentials_is_told_what_is_missing(authority: NodeProcess) -> None:
    out = subprocess.run(
        [str(BIN / "mesh-ctl"), "--node", authority.control, "--timeout", "3", "status"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert "secured mesh" in out.stderr and "--state-dir" in out.stderr, out.stderr


def test_api_keys_guard_every_way_to_start_generation_on_an_open_mesh(
    tmp_path: Path, tiny_model: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# our keys\nk2\n")
    node = start_node(tmp_path, tiny_model, "--api-key", "k1", "--api-key-file", str(keys), "--no-mdns")
    try:
        status = node.status()
        assert status["secure"] is False
        assert "OPEN MESH: any host on this LAN can join" in node.log_path.read_text()
        bare = httpx.post(f"{node.url}/v1/completions", json={"model": MODEL, "prompt": "hi"}, timeout=60)
        assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
        for key, ok in (("wrong", False), ("k1", True), ("k2", True)):
            oai = openai.OpenAI(base_url=f"{node.url}/v1", api_key=key, max_retries=0, timeout=60)
            if ok:
                assert (
                    oai.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].text is not None
                )
            else:
                with pytest.raises(openai.AuthenticationError):
                    oai.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        # The router's port on the LAN: a raw request without the key is refused, with one it is taken.
        ctx = zmq.Context()
        try:
            for key, expect in (("", "refused"), ("nope", "refused"), ("k2", "accepted")):
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(f"tcp://127.0.0.1:{node.zmq_port + 1}")
                sock.send(
                    encode(
                        Generate(request_id=f"r-{key}", model=MODEL, prompt="hi", max_tokens=2, api_key=key)
                    )
                )
                assert sock.poll(10_000), "no answer"
                first = decode(sock.recv())
                sock.close()
                if expect == "refused":
                    assert isinstance(first, ErrorReply) and first.code == "invalid_api_key", first
                else:
                    assert not isinstance(first, ErrorReply), first
        finally:
            ctx.term()
    finally:
        node.stop()


def test_a_dense_split_of_a_secured_mesh_tunnels_to_an_invited_stage(
    authority_split: NodeProcess, tmp_path: Path, tiny_model: Path
) -> None:
    """The head's RPC tunnel to its stage runs over the secured tunnel port: the split forms with
    an invited stage, serves, and the stage refused nobody it should have taken."""
    models = tmp_path / "held"
    models.mkdir()
    (models / tiny_model.name).symlink_to(tiny_model)
    stage = launch(
        tmp_path, None, "--join", authority_split.invite(), "--peer", f"127.0.0.1:{authority_split.zmq_port}",
        "--no-mdns", models_dir=models,
    )  # fmt: skip
    try:

        def split_state() -> str:
            rows = authority_split.status()["splits"]
            return rows[0]["state"] if rows else "none"

        eventually(lambda: split_state() == "serving", 90, split_state)
        oai = openai.OpenAI(base_url=f"{authority_split.url}/v1", api_key="x", max_retries=0, timeout=60)
        assert (
            oai.completions.create(model=MODEL, prompt="hello", max_tokens=4, temperature=0).choices[0].text
        )
        row = authority_split.status()["splits"][0]
        assert [s["node_id"] for s in row["stages"]][-1] == stage.status()["node_id"] or len(
            row["stages"]
        ) == 2
        assert "refused a connection to the tunnel port" not in stage.log_path.read_text()
    finally:
        stage.stop()


@pytest.fixture
def authority_split(tmp_path: Path, tiny_model: Path) -> Iterator[NodeProcess]:
    node = launch(tmp_path, tiny_model, "--secure", "--split", "--no-mdns")
    try:
        wait_http(node)  # not ready: its split waits for a stage
        yield node
    finally:
        node.stop()

"""mDNS discovery with real zeroconf bound to 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from discovery import SERVICE_TYPE, Advert, MdnsDiscovery, mesh_hash

WAIT_S = 10.0


class Seen:
    """Collects callbacks from zeroconf's thread; waits on a condition with a timeout."""

    def __init__(self) -> None:
        self.adverts: dict[str, Advert] = {}
        self.gone: list[str] = []
        self._cv = threading.Condition()

    def on_seen(self, advert: Advert) -> None:
        with self._cv:
            self.adverts[advert.node_id] = advert
            self._cv.notify_all()

    def on_gone(self, node_id: str) -> None:
        with self._cv:
            self.gone.append(node_id)
            self._cv.notify_all()

    def wait(self, condition: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
        with self._cv:
            return self._cv.wait_for(condition, timeout_s)


def advert(mesh: str, port: int = 9338) -> Advert:
    return Advert(
        node_id=f"n-{uuid.uuid4().hex[:8]}",
        mesh=mesh_hash(mesh),
        host="127.0.0.1",
        zmq_port=port,
        http_port=9337,
    )


@pytest.fixture
def mesh() -> str:
    return f"test-{uuid.uuid4().hex}"  # tests never see each other's nodes


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


def node(stack: ExitStack, ad: Advert) -> Seen:
    seen = Seen()
    stack.enter_context(MdnsDiscovery(ad, on_seen=seen.on_seen, on_gone=seen.on_gone))
    return seen


def test_three_nodes_of_one_mesh_find_each_other_with_their_ports(mesh: str, stack: ExitStack) -> None:
    ads = [advert(mesh, 9400 + i) for i in range(3)]
    seen = [node(stack, ad) for ad in ads]
    started = time.monotonic()
    for me, s in zip(ads, seen, strict=True):
        others = {a.node_id for a in ads} - {me.node_id}
        assert s.wait(lambda s=s, others=others: others <= s.adverts.keys()), s.adverts
        assert me.node_id not in s.adverts
    assert time.monotonic() - started < WAIT_S
    assert seen[0].adverts[ads[1].node_id] == ads[1]


def test_nodes_of_different_meshes_never_report_each_other(mesh: str, stack: ExitStack) -> None:
    mine, theirs = advert(mesh), advert(mesh + "-other")
    seen_a = Seen()
    a = stack.enter_context(MdnsDiscovery(mine, on_seen=seen_a.on_seen, on_gone=seen_a.on_gone))
    seen_b = node(stack, theirs)
    friend = advert(mesh)
    node(stack, friend)
    assert seen_a.wait(lambda: friend.node_id in seen_a.adverts)
    assert theirs.node_id not in seen_a.adverts and mine.node_id not in seen_b.adverts
    assert a.stats["other_mesh"] >= 1


def test_a_node_that_closes_is_reported_gone(mesh: str, stack: ExitStack) -> None:
    watcher = node(stack, advert(mesh))
    leaving_ad = advert(mesh)
    leaving = MdnsDiscovery(leaving_ad, on_seen=lambda a: None, on_gone=lambda n: None).start()
    try:
        assert watcher.wait(lambda: leaving_ad.node_id in watcher.adverts)
    finally:
        leaving.close()
        leaving.close()  # idempotent
    assert watcher.wait(lambda: leaving_ad.node_id in watcher.gone)


@pytest.mark.parametrize(
    "props",
    [
        {"node": "x", "mesh": "?", "proto": "1", "zmq": "not-a-port", "http": "1"},  # malformed
        {"node": "x", "proto": "1", "zmq": "1", "http": "1"},  # no mesh
        {"node": "x", "mesh": "?", "proto": "999", "zmq": "1", "http": "1"},  # another protocol
    ],
)
def test_malformed_or_foreign_adverts_are_ignored_and_counted(
    mesh: str, stack: ExitStack, props: dict[str, str]
) -> None:
    me = advert(mesh)
    seen = Seen()
    discovery = stack.enter_context(MdnsDiscovery(me, on_seen=seen.on_seen, on_gone=seen.on_gone))
    if "mesh" in props:
        props = {**props, "mesh": me.mesh}
    rogue = stack.enter_context(_Raw(props))
    friend = advert(mesh)
    node(stack, friend)  # a valid node arriving after shows the browser went on working
    assert seen.wait(lambda: friend.node_id in seen.adverts)
    assert rogue.name not in seen.adverts and "x" not in seen.adverts
    assert discovery.stats["bad_txt"] + discovery.stats["other_proto"] >= 1


class _Raw:
    """A service registered by hand with whatever TXT properties a test wants."""

    def __init__(self, props: dict[str, str]) -> None:
        self.name = f"rogue-{uuid.uuid4().hex[:8]}"
        self.zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
        self.info = ServiceInfo(
            SERVICE_TYPE,
            f"{self.name}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton("127.0.0.1")],
            port=1,
            properties=props,
            server=f"{self.name}.local.",
        )

    def __enter__(self) -> _Raw:
        self.zc.register_service(self.info)
        return self

    def __exit__(self, *exc: object) -> None:
        self.zc.unregister_all_services()
        self.zc.close()

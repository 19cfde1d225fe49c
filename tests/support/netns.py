"""Test hosts in network namespaces: a bridge in a namespace of its own, one namespace per host,
veth pairs between them. Everything made here is removed by `close()`, even after a failure."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tests.support.nodes import BIN

T = TypeVar("T")
_CLONE_NEWNET = 0x40000000


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def can_make_namespaces() -> str | None:
    """None if this machine lets us make namespaces, else why not (for a printed skip reason)."""
    if os.geteuid() != 0:
        return "network namespace tests need root (ip netns)"
    probe = f"mlprobe{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except (OSError, subprocess.CalledProcessError) as err:
        return f"cannot create network namespaces here: {err}"
    _ip("netns", "del", probe)
    return None


class Lan:
    """A switch (bridge) and hosts `10.231.<n>.<i>/24` attached to it."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:5]
        self.subnet = 231
        self.switch = f"mlsw{self.tag}"
        self.hosts: dict[str, str] = {}  # namespace -> address
        self._made: list[str] = []
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def add_host(self) -> tuple[str, str]:
        """A new host: (namespace, address)."""
        i = len(self.hosts) + 1
        ns = f"mlh{self.tag}{i}"
        address = f"10.{self.subnet}.0.{i}"
        _ip("netns", "add", ns)
        self._made.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", "netns", self.switch)
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0")
        _ip("-n", self.switch, "link", "set", f"p{i}", "up")
        self.hosts[ns] = address
        return ns, address

    def limit(self, ns: str, rate: str = "1gbit") -> None:
        """Shape what a host sends to `rate` (a token bucket on its interface)."""
        _ip_netns_exec(
            ns,
            "tc",
            "qdisc",
            "add",
            "dev",
            "eth0",
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            "256kb",
            "latency",
            "50ms",
        )

    def tx_bytes(self, ns: str) -> int:
        """Bytes a host has sent on its interface."""
        out = subprocess.run(
            ["ip", "-n", ns, "-s", "-j", "link", "show", "eth0"], check=True, capture_output=True, text=True
        )
        return int(json.loads(out.stdout)[0]["stats64"]["tx"]["bytes"])

    def unplug(self, ns: str) -> None:
        """Partition a host from the others (its switch port goes down)."""
        _ip("-n", self.switch, "link", "set", self._port(ns), "down")

    def plug(self, ns: str) -> None:
        _ip("-n", self.switch, "link", "set", self._port(ns), "up")

    def _port(self, ns: str) -> str:
        return f"p{list(self.hosts).index(ns) + 1}"

    def close(self) -> None:
        """Delete every namespace made (veths and the bridge go with them); idempotent."""
        while self._made:
            ns = self._made.pop()
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def mesh_ctl(
    ns: str, address: str, *args: str, zmq_port: int = 9338, state: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`mesh-ctl` run on host `ns` against its node at address:zmq_port (with the credentials of
    the node's `state` directory, for a secured node)."""
    creds = ["--state-dir", str(state)] if state is not None else []
    argv = ["ip", "netns", "exec", ns, str(BIN / "mesh-ctl"), "--node", f"tcp://{address}:{zmq_port}", *creds]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=30)


def _ip_netns_exec(ns: str, *argv: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, capture_output=True, text=True)


def run_in(ns: str, call: Callable[[], T]) -> T:
    """`call()` on a thread that has entered `ns`'s network (the sockets it opens live there)."""
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
            finally:
                os.close(fd)
            result.append(call())
        except BaseException as err:  # handed to the caller's thread
            errors.append(err)

    thread = threading.Thread(target=run, name=f"in-{ns}")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]

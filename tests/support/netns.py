"""Test hosts in network namespaces: a bridge in a namespace of its own, one namespace per host,
veth pairs between them. Everything made here is removed by `close()`, even after a failure."""

from __future__ import annotations

import os
import subprocess
import uuid


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

    def unplug(self, ns: str) -> None:
        """Partition a host from the others (its switch port goes down)."""
        _ip("-n", self.switch, "link", "set", self._port(ns), "down")

    def plug(self, ns: str) -> None:
        _ip("-n", self.switch, "link", "set", self._port(ns), "up")

    def _port(self, ns: str) -> str:
        return f"p{list(self.hosts).index(ns) + 1}"

    def close(self) -> None:
        """Delete every namespace made (veths and the bridge go with them)."""
        while self._made:
            ns = self._made.pop()
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

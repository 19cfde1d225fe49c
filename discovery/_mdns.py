"""mDNS discovery with zeroconf: advertise this node, report the adverts of its mesh's nodes.

The service type is `_mesh-llm._tcp.local.`; an instance is named after its node id and its TXT
record carries `node`, `mesh` (a hash of the mesh name, never the name itself), `proto`, `zmq`,
`http` and `role`. zeroconf runs only on the interface that holds `host`. Callbacks run on
zeroconf's browser thread: they must hand over to an actor through their own socket, never touch
an actor's.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from actors import PROTOCOL_VERSION

log = logging.getLogger(__name__)

SERVICE_TYPE = "_mesh-llm._tcp.local."
_INFO_TIMEOUT_MS = 3000  # how long to wait for a peer's SRV/TXT answer after it appears


def mesh_hash(name: str) -> str:
    """What a TXT record says of a mesh: enough to tell meshes apart, nothing to join one by."""
    return hashlib.sha256(b"mesh-llm/" + name.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True, kw_only=True)
class Advert:
    """What one node says about itself over mDNS."""

    node_id: str
    mesh: str  # mesh_hash(name)
    host: str
    zmq_port: int
    http_port: int
    role: str = "serving"
    proto: int = PROTOCOL_VERSION

    def txt(self) -> dict[str, str]:
        return {
            "node": self.node_id,
            "mesh": self.mesh,
            "proto": str(self.proto),
            "zmq": str(self.zmq_port),
            "http": str(self.http_port),
            "role": self.role,
        }

    @classmethod
    def from_txt(cls, host: str, props: dict[bytes, bytes | None]) -> Advert:
        """Parse a peer's TXT record; raises ValueError for anything missing or malformed."""
        text = {k.decode(): v.decode() for k, v in props.items() if v is not None}
        try:
            advert = cls(
                node_id=text["node"],
                mesh=text["mesh"],
                host=host,
                zmq_port=int(text["zmq"]),
                http_port=int(text["http"]),
                role=text.get("role", "serving"),
                proto=int(text["proto"]),
            )
        except (KeyError, ValueError) as err:
            raise ValueError(f"bad TXT record {text}: {err}") from err
        if not advert.node_id or not (0 < advert.zmq_port < 65536 and 0 < advert.http_port < 65536):
            raise ValueError(f"bad TXT record {text}")
        return advert


SeenCallback = Callable[[Advert], None]
GoneCallback = Callable[[str], None]


class MdnsDiscovery:
    """Advertises `advert` and reports other nodes of the same mesh and protocol.

    `on_seen(advert)` and `on_gone(node_id)` run on zeroconf's browser thread. `start()` and
    `close()` block briefly (registration, goodbye packets); `close()` is idempotent.
    """

    def __init__(self, advert: Advert, *, on_seen: SeenCallback, on_gone: GoneCallback) -> None:
        self.advert = advert
        self.on_seen = on_seen
        self.on_gone = on_gone
        self.stats: Counter[str] = Counter()
        self._zc: Any = None
        self._browser: Any = None
        self._names: dict[str, str] = {}  # instance name -> node id, for removals
        self._lock = threading.Lock()

    def start(self) -> MdnsDiscovery:
        self._zc = Zeroconf(interfaces=[self.advert.host], ip_version=IPVersion.V4Only)
        # Instance names are node ids (host name + random suffix), unique by construction, so the
        # ~2 s of uniqueness probing buys nothing and would delay every join.
        self._zc.register_service(self._info(), cooperating_responders=True)
        self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_change])
        return self

    def close(self) -> None:
        with self._lock:
            zc, browser = self._zc, self._browser
            self._zc = self._browser = None
        if browser is not None:
            browser.cancel()
        if zc is not None:
            zc.unregister_all_services()  # goodbye packets: peers forget us at once
            zc.close()

    def __enter__(self) -> MdnsDiscovery:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _info(self) -> Any:
        return ServiceInfo(
            SERVICE_TYPE,
            f"{self.advert.node_id}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(self.advert.host)],
            port=self.advert.zmq_port,
            properties=self.advert.txt(),
            server=f"{self.advert.node_id}.local.",
        )

    def _on_change(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        """zeroconf's browser thread: a service appeared, changed or left."""
        if state_change is ServiceStateChange.Removed:
            node_id = self._names.pop(name, None)
            if node_id is not None:
                self.on_gone(node_id)
            return
        info = zeroconf.get_service_info(service_type, name, timeout=_INFO_TIMEOUT_MS)
        if info is None or not info.parsed_addresses():
            self.stats["unresolved"] += 1
            return
        try:
            advert = Advert.from_txt(info.parsed_addresses()[0], info.properties)
        except ValueError as err:
            self.stats["bad_txt"] += 1
            log.debug("ignoring %s: %s", name, err)
            return
        if advert.node_id == self.advert.node_id:
            return
        if advert.mesh != self.advert.mesh:
            self.stats["other_mesh"] += 1
            return
        if advert.proto != self.advert.proto:
            self.stats["other_proto"] += 1
            return
        self._names[name] = advert.node_id
        self.stats["seen"] += 1
        self.on_seen(advert)

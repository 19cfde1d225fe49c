"""What the network-namespace tests share: a LAN (a bridge) they add hosts to, removed after."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.netns import Lan


@pytest.fixture
def lan() -> Iterator[Lan]:
    network = Lan()
    try:
        yield network
    finally:
        network.close()

"""Composition and control plane: `Node` assembles one node's actors (router, shard-workers,
control, and actors of other rooms such as gossip) and can add and retire workers at runtime;
`Control` answers `mesh-ctl`."""

from actors.node._control import Control
from actors.node._node import VERSION, ModelSpec, Node, NodeSpec

__all__ = ["VERSION", "Control", "ModelSpec", "Node", "NodeSpec"]

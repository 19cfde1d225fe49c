"""`mesh-llm`: argv -> a node spec, the composition root of a node process (actors, gossip,
mDNS, the HTTP server), its state dir and identity, and the built-in default model."""

from gateway.cli._serve import main

__all__ = ["main"]

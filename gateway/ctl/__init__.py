"""`mesh-ctl`: status, peers, models over ZeroMQ; model synthesis; MoE analysis and split."""

from gateway.ctl._main import main

__all__ = ["main"]
